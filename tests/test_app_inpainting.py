"""The demo's Inpaint tab (app.py `inpainting_tab`): served in this process and driven in headless Chromium: upload a
digit (or make one), paint over part of it, inpaint; the page shows what the model keeps and exactly the completions
`pipe(class, image=, mask_image=, ...)` gives for that mask."""

import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the demo needs the [demo] extra: pip install -e '.[demo]'")
# The browser, and the helpers that read the page, are the demo test's (it skips the module without Chromium).
from test_app import _pixels, _set_number, browser  # noqa: E402, F401

import rar_hf  # noqa: E402
from rar_hf.data.digits import digits_to_images, split_digits  # noqa: E402
from rar_hf.pipeline_rar import RARPipeline  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DIGITS = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"
SEED, NUM_IMAGES = 7, 2


@pytest.fixture(scope="module")
def app_module():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import app
    finally:
        sys.path.remove(str(REPO_ROOT))
    return app


@pytest.fixture(scope="module")
def pipe(one_thread):
    pipe = RARPipeline.from_pretrained(TINY_DIGITS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def served(app_module, pipe):
    """The demo on 127.0.0.1, served by this process (the pipeline calls of the page run with this test's threads)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app_module.build_demo(pipe)
    style = app_module.STYLE if app_module.STYLE_IN_LAUNCH else {}
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **style)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def digit_png(folder: Path) -> Path:
    digits, _ = split_digits()["test"]
    path = folder / "digit.png"
    digits_to_images(digits[2:3], 32)[0].save(path)  # a held-out "3"
    return path


def token_mask(regenerated: np.ndarray, patch: int) -> Image.Image:
    """The white-on-black mask of regenerated tokens `(h, w)` at `patch` pixels per token."""
    return Image.fromarray(np.kron(regenerated.astype(np.uint8) * 255, np.ones((patch, patch), np.uint8)))


def regenerated_tokens(kept_view: np.ndarray, grid: int) -> np.ndarray:
    """The tokens the page's "what the model keeps" view shows mid-gray (128 over the whole patch)."""
    patch = kept_view.shape[0] // grid
    cells = kept_view.reshape(grid, patch, grid, patch, 3)
    return (cells == 128).all(axis=(1, 3, 4))


def paint_lower_part(driver, editor):
    """Pick the brush and paint a horizontal stroke across the lower part of the image (it must start over the image;
    the brush draws along the pointer moves)."""
    next(b for b in editor.find_elements(By.CSS_SELECTOR, "button") if b.get_attribute("aria-label") == "Brush").click()
    canvas = editor.find_element(By.CSS_SELECTOR, "canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    width, height = canvas.size["width"], canvas.size["height"]
    # offsets from the canvas centre
    stroke = ActionChains(driver, duration=10).move_to_element_with_offset(canvas, int(-0.3 * width), int(0.25 * height))
    stroke = stroke.click_and_hold()
    for _ in range(6):
        stroke = stroke.move_by_offset(int(0.1 * width), 0)
    stroke.release().perform()


# Records the classes of the editor's status tracker: gradio shows it while an event writes to the editor.
RECORD_EDITOR_STATUS = """
window.__editor_status = [];
const tracker = document.querySelector('#inpaint-editor [data-testid=status-tracker]');
new MutationObserver(() => window.__editor_status.push(tracker.className)).observe(tracker, {attributes: true});
"""


def editor_update_done(driver) -> bool:
    states = driver.execute_script("return window.__editor_status")
    busy = [i for i, state in enumerate(states) if "hide" not in state.split()]
    return bool(busy) and any("hide" in state.split() for state in states[busy[0] :])


def inpaint_and_check(driver, pipe, image, class_id):
    """Click Inpaint; the kept view must show regenerated tokens only in the painted lower part, and the gallery the
    pipeline's completions for the mask of those tokens."""
    wait = WebDriverWait(driver, 60)
    driver.find_element(By.ID, "inpaint").click()
    wait.until(lambda d: "Done" in d.find_element(By.ID, "inpaint-status").text)
    time.sleep(0.5)
    grid = pipe.transformer.config.latent_size[0]
    kept_view = _pixels(driver.find_element(By.CSS_SELECTOR, "#inpaint-kept img").get_attribute("src"))
    regenerated = regenerated_tokens(kept_view, grid)
    assert regenerated.any() and not regenerated[: grid // 3].any(), regenerated.astype(int)
    status = driver.find_element(By.ID, "inpaint-status").text
    assert f"regenerated {int(regenerated.sum())} of {grid * grid} tokens" in status and f"class {class_id}" in status
    expected = pipe(class_id, image=image, mask_image=token_mask(regenerated, pipe.vqvae.downsample_factor),
                    num_images_per_prompt=NUM_IMAGES, generator=torch.Generator().manual_seed(SEED)).images  # fmt: skip
    sources = list(dict.fromkeys(img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#inpaint-gallery img")))
    assert len(sources) == NUM_IMAGES
    for source, reference in zip(sources, expected):
        np.testing.assert_array_equal(_pixels(source), np.asarray(reference.convert("RGB")))


def test_inpaint_tab_completes_a_painted_region_in_a_browser(served, browser, pipe, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(served)
    # The demo opens on its "Generate" tab; the inpainting UI is the sibling tab.
    tabs = wait.until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Inpaint"])
    tabs[0].click()
    editor = wait.until(lambda d: d.find_element(By.ID, "inpaint-editor"))
    _set_number(browser, "#inpaint-num-images input[type=number]", NUM_IMAGES)
    _set_number(browser, "#inpaint-seed input[type=number]", SEED)
    picker = browser.find_element(By.CSS_SELECTOR, "#inpaint-class input")
    picker.click()
    picker.send_keys(Keys.CONTROL, "a")
    picker.send_keys("8:")

    def filtered(d):  # the list is filtered asynchronously and re-rendered as it goes: wait for the filtered one
        try:
            options = [o for o in d.find_elements(By.CSS_SELECTOR, "#inpaint-class .options li") if o.text.strip()]
            return options if options and all(o.text.strip().startswith("8:") for o in options) else False
        except StaleElementReferenceException:
            return False

    wait.until(filtered, message="the class picker never listed only the classes matching '8:'")[0].click()

    # An uploaded held-out "3", its lower part regenerated as an 8.
    path = digit_png(tmp_path)
    editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    wait.until(lambda d: editor.find_elements(By.CSS_SELECTOR, "canvas"))
    time.sleep(1)
    paint_lower_part(browser, editor)
    inpaint_and_check(browser, pipe, Image.open(path), class_id=8)

    # A generated image: "Make an image of this class" puts pipe(8, seed) in the editor; paint and inpaint again.
    browser.execute_script(RECORD_EDITOR_STATUS)
    browser.find_element(By.ID, "inpaint-make").click()
    wait.until(editor_update_done)
    time.sleep(0.5)
    paint_lower_part(browser, editor)
    made = pipe(8, generator=torch.Generator().manual_seed(SEED)).images[0]
    inpaint_and_check(browser, pipe, made, class_id=8)


def test_the_editor_value_gives_the_image_and_the_painted_mask(app_module, pipe):
    import gradio as gr

    background = Image.new("RGB", (32, 32), (10, 20, 30))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (0, 20, 32, 32))  # painted: the bottom 12 rows
    image, mask = app_module.editor_image_and_mask({"background": background, "layers": [layer], "composite": None})
    assert image.size == (32, 32) and np.asarray(image)[0, 0].tolist() == [10, 20, 30]
    painted = np.asarray(mask) > 0
    assert painted[20:].all() and not painted[:20].any()
    # Rows 16-19 (token row 4) are not painted, rows 20-23 are: token rows 5-7 are regenerated.
    keep = pipe.prepare_mask(mask)[1].view(8, 8)
    assert keep[:5].all() and not keep[5:].any()
    with pytest.raises(gr.Error, match="Upload an image"):
        app_module.editor_image_and_mask({"background": None, "layers": []})
    with pytest.raises(gr.Error, match="nothing is painted"):
        app_module.editor_image_and_mask({"background": background, "layers": [Image.new("RGBA", (32, 32))]})
    # The completions are the pipeline's, for that image and mask.
    kept, images, status = app_module.inpaint_images(pipe, {"background": background, "layers": [layer]}, 3, 2, 1.0, 5)
    expected = pipe(3, image=background, mask_image=mask, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5))
    for image, reference in zip(images, expected.images):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
    assert kept.size == (256, 256) and "regenerated 24 of 64 tokens" in status
