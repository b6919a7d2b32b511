"""The Gradio demo (app.py) served on 127.0.0.1 and driven in a real headless Chromium: type-ahead class picker,
the controls, generate, the per-token previews and the final gallery, compared pixel for pixel with the pipeline."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rar_hf
from rar_hf.pipeline_rar import RARPipeline

pytest.importorskip("gradio", reason="the demo needs the [demo] extra: pip install -e '.[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium ([test] extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = REPO_ROOT / "outputs" / "app-screenshot.png"
TINY_DIGITS = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(
        f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): `make test` installs them",
        allow_module_level=True,
    )

# What the test asks for in the page: not the page's defaults, so each control must reach the pipeline.
CLASS_QUERY, CLASS_ID, CLASS_CHOICE = "three", 3, "3, three"
NUM_IMAGES, GUIDANCE, TEMPERATURE, SEED = 3, 1.5, 0.9, 1234


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(
        os.environ,
        # the app imports the same rar_hf as this test, whatever is installed
        PYTHONPATH=os.pathsep.join([str(Path(rar_hf.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # as the test's own pipeline call (one_thread): the same float sums, the same tokens
    )
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer on {url}:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for a driver online: we name Debian's
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # needed as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Nothing but the app is reachable (the machine is offline anyway): a request elsewhere fails at once.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def expected(one_thread):
    """The pipeline's own output for what the test picks in the page."""
    pipe = RARPipeline.from_pretrained(TINY_DIGITS)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        CLASS_ID,
        num_images_per_prompt=NUM_IMAGES,
        guidance_scale=GUIDANCE,
        temperature=TEMPERATURE,
        generator=torch.Generator().manual_seed(SEED),
    )
    return pipe, output


def _set_number(driver, selector: str, value):
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)  # gradio reads the value on change/blur


def _pixels(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(BytesIO(response.read())).convert("RGB"))


# Records what the page shows after every DOM change: the status line and the gallery's image addresses. The
# previews flash by in well under a second with the tiny model, too fast to poll.
RECORD_PAGE = """
window.__shown = [];
new MutationObserver(() => {
  const status = document.querySelector('#status').innerText;
  const sources = [...document.querySelectorAll('#gallery img')].map(img => img.src);
  window.__shown.push([status, [...new Set(sources)]]);
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def test_app_generates_the_pipeline_images_in_a_browser(app_url, browser, expected):
    pipe, output = expected
    wait = WebDriverWait(browser, 60)
    browser.get(app_url)

    # The class picker filters the label names as one types.
    picker = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#class-picker input"))
    picker.click()
    picker.send_keys(Keys.CONTROL, "a")
    picker.send_keys(CLASS_QUERY)
    options = wait.until(
        lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "#class-picker .options li") if o.text.strip()]
    )
    assert [option.text.strip() for option in options] == [CLASS_CHOICE]
    options[0].click()
    assert picker.get_attribute("value") == CLASS_CHOICE

    _set_number(browser, "#num-images input[type=number]", NUM_IMAGES)
    _set_number(browser, "#guidance input[type=number]", GUIDANCE)
    _set_number(browser, "#temperature input[type=number]", TEMPERATURE)
    _set_number(browser, "#seed input[type=number]", SEED)
    browser.execute_script(RECORD_PAGE)
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda d: "Done" in d.find_element(By.ID, "status").text)
    time.sleep(0.5)  # let the gallery settle on the final images
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # The final gallery: the pipeline's images for that class and seed, exactly (the gallery serves PNGs).
    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    sources = list(dict.fromkeys(img.get_attribute("src") for img in images))
    assert len(sources) == NUM_IMAGES
    shown = [_pixels(source) for source in sources]
    for image, reference in zip(shown, output.images):
        assert image.std() > 20, "a blank image in the gallery"
        np.testing.assert_array_equal(image, np.asarray(reference.convert("RGB")))
    status = browser.find_element(By.ID, "status").text
    assert f"class {CLASS_ID}" in status and f"seed {SEED}" in status

    # While the tokens arrived, the progress bar counted them and the gallery showed the partial images: exactly
    # the first k tokens decoded, mid-gray below.
    history = browser.execute_script("return window.__shown")
    seq_len = pipe.transformer.config.image_seq_len
    counted = {int(m.group(1)) for status, _ in history for m in [re.search(rf"(\d+)/{seq_len} tokens", status)] if m}
    # (the page polls the server's count, so it shows some of the steps, not all)
    assert len(counted) >= 3, f"no per-token progress seen: {sorted(counted)}"
    previews = {}
    for status, preview_sources in history:
        match = re.search(rf"Token (\d+) of {seq_len}", status)
        if match and len(preview_sources) == NUM_IMAGES:
            previews.setdefault(int(match.group(1)), preview_sources)
    assert len(previews) >= 2, f"no live previews seen: {history[-5:]}"
    step = min(previews)
    partial = pipe.decode_partial(output.tokens[:, :step])
    for source, reference in zip(previews[step], partial):
        np.testing.assert_array_equal(_pixels(source), np.asarray(reference.convert("RGB")))
    last_row = np.asarray(partial[0])[-(partial[0].height // pipe.transformer.config.latent_size[0]) :]
    assert step < seq_len - pipe.transformer.config.latent_size[1] and (last_row == 128).all()  # not generated: gray
