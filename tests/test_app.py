"""The Gradio demo (app.py): its generation function in-process (class labels, bad input), its Hugging Face Space
files, and the page served on 127.0.0.1 and driven in a real headless Chromium: type-ahead class picker, the
controls, generate, the progress bar, the per-token previews (never hidden by an overlay) and the final gallery,
compared pixel for pixel with the pipeline."""

import configparser
import importlib.util
import os
import re
import shlex
import socket
import time
import urllib.request
from io import BytesIO
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from PIL import Image

import rar_hf
from rar_hf.pipeline_rar import RARPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = REPO_ROOT / "outputs" / "app-screenshot.png"
TINY_DIGITS = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"

# What the browser test asks for in the page: not the page's defaults, so each control must reach the pipeline.
CLASS_QUERY, CLASS_ID, CLASS_CHOICE = "three", 3, "3, three"
NUM_IMAGES, GUIDANCE, TEMPERATURE, SEED = 3, 1.5, 0.9, 1234


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    return config


def _requirements(text: str) -> set[str]:
    """Requirement lines (comments and blanks dropped), normalised by `packaging`."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {str(Requirement(line)) for line in lines if line}


# --- The Hugging Face Space: what README.md's "Demo app" section says a Space reads is there and consistent. ---


def test_readme_front_matter_configures_a_gradio_space():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(REPO_ROOT / "README.md")  # the Hub's own parser of the YAML block
    assert card.data.sdk == "gradio"
    assert (REPO_ROOT / card.data.app_file).is_file() and card.data.app_file == "app.py"
    # The Space runs the gradio the app is tested with (constraints.txt) on a Python the package supports.
    pins = dict(line.split("==") for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert card.data.sdk_version == pins["gradio"]
    assert isinstance(card.data.python_version, str), "quote python_version: YAML reads 3.10 as the number 3.1"
    assert card.data.python_version in SpecifierSet(_setup_cfg()["options"]["python_requires"])
    assert card.data.license == _setup_cfg()["metadata"]["license"].lower()
    # The README still opens with its title on GitHub, right after the block.
    assert card.text.lstrip().startswith("# rar-hf\n")


def test_space_requirements_install_what_the_package_and_its_demo_need():
    # A Space installs requirements.txt before the repository is copied in, so the file cannot install the package
    # itself (`.`); it installs the package's dependencies and app.py imports rar_hf from src/.
    config = _setup_cfg()
    wanted = _requirements(config["options"]["install_requires"] + "\n" + config["options.extras_require"]["demo"])
    assert _requirements((REPO_ROOT / "requirements.txt").read_text()) == wanted


FLAGS = ("--include", "--exclude")


def test_readme_space_upload_takes_what_the_app_needs():
    """The `hf upload` command of README.md's Space paragraph selects the app, its Space files and the whole package
    (with the shipped pipeline), and nothing else: no tests, no local environment, no outputs."""
    from huggingface_hub.utils import filter_repo_objects

    readme = (REPO_ROOT / "README.md").read_text()
    line = re.search(r"^hf upload .*?[^\\]$", readme, re.MULTILINE | re.DOTALL).group(0)
    command = shlex.split(line.replace("\\\n", " "))
    include, exclude = ([value for flag, value in pairwise(command) if flag == name] for name in FLAGS)

    def files(folder):
        return {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / folder).rglob("*") if p.is_file()}

    package = {name for name in files("src/rar_hf") if not name.endswith(".pyc")}
    assert "src/rar_hf/pretrained/tiny-digits/model_index.json" in package
    present = files("src") | files("tests") | {p.name for p in REPO_ROOT.iterdir() if p.is_file()}
    present |= {".venv/lib/python3.11/site-packages/torch/__init__.py", "outputs/a.png", "src/rar_hf/__pycache__/a.pyc"}
    uploaded = set(filter_repo_objects(sorted(present), allow_patterns=include, ignore_patterns=exclude))
    assert uploaded == {"README.md", "app.py", "requirements.txt"} | package


# --- app.py in-process ---


@pytest.fixture(scope="module")
def app():
    pytest.importorskip("gradio", reason="the demo needs the [demo] extra: pip install -e '.[demo]'")
    spec = importlib.util.spec_from_file_location("rar_hf_demo_app", REPO_ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_pipe(one_thread):
    pipe = RARPipeline.from_pretrained(TINY_DIGITS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_space_variable_picks_the_model(app, monkeypatch):
    monkeypatch.setenv("RAR_HF_MODEL", "org/rar-xl")
    assert app.parse_args([]).model == "org/rar-xl"
    monkeypatch.delenv("RAR_HF_MODEL")
    assert app.parse_args([]).model == str(TINY_DIGITS)


def test_class_picker_offers_every_class_then_unconditional(app):
    assert app.class_choices({0: "crane", 1: "tench", 2: "crane"}) == [
        ("crane (0)", 0), ("tench", 1), ("crane (2)", 2), ("unconditional", "unconditional"),
    ]


def test_app_generates_unconditional_images(app, tiny_pipe):
    """The picker's "unconditional" entry gives `pipe(None)`'s images."""
    *_, (images, status) = app.generate_images(tiny_pipe, "unconditional", 1, 1.0, 1.0, 7)
    reference = tiny_pipe(None, guidance_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(reference.images[0]))
    assert status == "Done: 1 unconditional image(s), seed 7."


@pytest.mark.parametrize("label", [None, -1, "none", "UNCONDITIONAL"])
def test_app_takes_the_other_spellings_of_the_null_class(app, tiny_pipe, label):
    """The app hands labels to the pipeline's one class-label rule (`get_label_ids`): it starts generating for each
    spelling of the null class (which images they give is the pipeline's test)."""
    stream = app.generate_images(tiny_pipe, label, 1, 1.0, 1.0, 7)
    seq_len = tiny_pipe.transformer.config.image_seq_len
    assert next(stream)[1].endswith(f"Generating: 0/{seq_len} tokens")  # checks passed; next comes the generation
    stream.close()


def test_app_refuses_a_bad_class_before_generating(app, tiny_pipe):
    stream = app.generate_images(tiny_pipe, "zebra", 1, 1.0, 1.0, 0)
    # The first step of the stream raises: nothing was generated (the generation thread starts after it).
    with pytest.raises(app.gr.Error, match="Unknown class name 'zebra'"):
        next(stream)


# --- The page, in Chromium ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): `make browser`")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium ([test] extra)")
    from selenium.webdriver.chrome.service import Service

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
def app_url(app, one_thread):
    """app.py's own `main`, serving on 127.0.0.1 from this process: the same torch threads as the test's pipeline
    call (the same float sums, the same tokens), and no second interpreter to start."""
    port = _free_port()
    demo = app.main(["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"], block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _set_number(driver, selector: str, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)  # gradio reads the value on change/blur


def _pixels(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(BytesIO(response.read())).convert("RGB"))


# Records what the page shows after every DOM change: the status line, its progress bar, the gallery's image
# addresses and any overlay over the gallery (a status tracker inside it that is shown and paints a background:
# gradio's progress overlay). The previews flash by in well under a second with the tiny model, too fast to poll.
RECORD_PAGE = """
window.__shown = [];
new MutationObserver(() => {
  const status = document.querySelector('#status').innerText;
  const bar = document.querySelector('#status progress');
  const sources = [...document.querySelectorAll('#gallery img')].map(img => img.src);
  const covers = [...document.querySelectorAll('#gallery [data-testid=status-tracker]')].filter(el =>
    !el.classList.contains('hide') && getComputedStyle(el).backgroundColor !== 'rgba(0, 0, 0, 0)');
  window.__shown.push([status, bar && bar.value, [...new Set(sources)], covers.map(el => el.className)]);
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def test_app_generates_the_pipeline_images_in_a_browser(browser, app_url, app, tiny_pipe):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    pipe = tiny_pipe
    output = pipe(
        CLASS_ID,
        num_images_per_prompt=NUM_IMAGES,
        guidance_scale=GUIDANCE,
        temperature=TEMPERATURE,
        generator=torch.Generator().manual_seed(SEED),
    )
    wait = WebDriverWait(browser, 60)
    browser.get(app_url)

    # The class picker filters the label names as one types; "unconditional" is one of its entries.
    picker = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#class-picker input"))

    def pick(query, expected):
        """Type `query` and wait until the picker lists exactly `expected`: the list is filtered asynchronously and
        re-rendered as it goes, so an earlier list (or one gone stale under us) is not the answer yet."""
        picker.click()
        picker.send_keys(Keys.CONTROL, "a")
        picker.send_keys(query)

        def listed(d):
            try:
                options = [o for o in d.find_elements(By.CSS_SELECTOR, "#class-picker .options li") if o.text.strip()]
                return options if [o.text.strip() for o in options] == expected else False
            except StaleElementReferenceException:
                return False

        return wait.until(listed, message=f"the class picker never listed exactly {expected} for {query!r}")

    pick("uncond", ["unconditional"])
    options = pick(CLASS_QUERY, [CLASS_CHOICE])
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

    history = browser.execute_script("return window.__shown")
    seq_len = pipe.transformer.config.image_seq_len

    # Nothing ever hid the gallery once it had images: no progress overlay over it at any update.
    start = next(i for i, (_, _, s, _) in enumerate(history) if len(s) == NUM_IMAGES)
    hidden = [(status, covers) for status, _, _, covers in history[start:] if covers]
    assert not hidden, f"an overlay hid the gallery at {len(hidden)} of {len(history) - start} updates: {hidden[:3]}"

    # While the tokens arrived, the progress bar counted them (the page shows the latest count, not every step).
    counted = {int(m.group(1)) for status, *_ in history for m in [re.search(rf"(\d+)/{seq_len} tokens", status)] if m}
    bar_values = {int(value) for _, value, _, _ in history if value is not None}
    assert len(counted) >= 3 and bar_values == counted, f"no per-token progress seen: {sorted(counted)}, {bar_values}"

    # The gallery showed partial images while the tokens arrived: each one exactly the first k tokens decoded (k a
    # multiple of the preview interval; the final images may show a moment before the status says "Done").
    previews = list(dict.fromkeys(tuple(s) for _, _, s, _ in history if len(s) == NUM_IMAGES))
    every = max(1, seq_len // app.NUM_PREVIEWS)
    partials = {k: pipe.decode_partial(output.tokens[:, :k]) for k in range(every, seq_len + 1, every)}
    steps = set()
    for preview in previews:
        pixels = [_pixels(source) for source in preview]
        matches = [
            k for k, partial in partials.items()
            if all(np.array_equal(p, np.asarray(r.convert("RGB"))) for p, r in zip(pixels, partial))
        ]
        assert matches, f"the gallery showed images that are not the pipeline's partial images: {preview}"
        steps.add(min(matches))
    assert len(steps - {seq_len}) >= 2, f"no live previews seen: {sorted(steps)}"
