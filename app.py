"""Gradio demo of a RAR pipeline: pick a class, watch the image tokens arrive, get the images.

    python app.py                                  # the shipped tiny-digits pipeline, offline, on CPU
    python app.py --model org/rar-xl               # any RARPipeline folder or Hub id
    RAR_HF_MODEL=org/rar-xl python app.py          # the same, as a Hugging Face Space sets it (a Space variable)

The images shown are exactly `pipe(class, num_images_per_prompt=n, guidance_scale=g, temperature=t,
generator=torch.Generator().manual_seed(seed))`: the same seed gives the same images as that call.
"""

import argparse
import inspect
import os
import queue
import sys
import threading
from pathlib import Path

# Set before gradio is imported: it reads this at import time, and the demo must run without network access.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import rar_hf
except ImportError:  # a Space runs this file from a checkout of the repository, where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import rar_hf

import gradio as gr
import torch

from rar_hf.pipeline_rar import RARPipeline

DEFAULT_MODEL = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"
MAX_IMAGES = 8
# Previews per image: each one decodes the partial token grid, so a handful is enough to watch the image build up.
NUM_PREVIEWS = 16
# The picker's entry for the null class. The app hands whatever the picker (or an API call) gives to the pipeline's
# `get_label_ids`, the one class-label rule: a class id or name, or None / -1 / "none" / "unconditional".
UNCONDITIONAL = "unconditional"

# Local fonts: the default theme links Google Fonts, which an offline machine cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# The shipped model makes 32x32 images: shown scaled up, they must stay sharp pixels rather than a blur. The progress
# bar in the status line gets half its width.
CSS = "#gallery img { image-rendering: pixelated; } #status progress { width: 50%; vertical-align: middle; }"
# gradio 6 takes the page style in launch(), older versions in Blocks().
STYLE = {"theme": THEME, "css": CSS}
STYLE_IN_LAUNCH = "css" in inspect.signature(gr.Blocks.launch).parameters
# Lossless images in the gallery (gradio >= 5 defaults to WebP; older versions always write PNG).
GALLERY_KWARGS = {"format": "png"} if "format" in inspect.signature(gr.Gallery.__init__).parameters else {}


def class_choices(id2label: dict[int, str]) -> list[tuple[str, int | str]]:
    """The picker's `(shown name, value)` pairs: one per class id, in id order, valued by the id; the class name is
    shown, with the id appended to names that several classes share (ImageNet has two "crane" and two "maillot").
    Then "unconditional"."""
    names = [id2label[i] for i in range(len(id2label))]
    choices = [(f"{name} ({i})" if names.count(name) > 1 else name, i) for i, name in enumerate(names)]
    return choices + [(UNCONDITIONAL, UNCONDITIONAL)]


def progress_text(done: int, total: int) -> str:
    """The status line while the tokens arrive: a progress bar and the count. The page's own progress overlay is not
    used: gradio shows it over the outputs between two yields and takes it off at each yield, which hid the gallery
    every other update."""
    return f'<progress value="{done}" max="{total}"></progress> Generating: {done}/{total} tokens'


def _waiting_events(events: queue.Queue) -> list:
    """The next event (waits for it), then every event already queued: the page shows the latest state at once
    instead of falling behind the tokens when it updates more slowly than they arrive."""
    batch = [events.get()]
    while True:
        try:
            batch.append(events.get_nowait())
        except queue.Empty:
            return batch


def generate_images(pipe: RARPipeline, class_label, num_images, guidance_scale, temperature, seed):
    """Run `pipe` in a thread and yield what the page shows, `(gallery, status)`: the previews (decoded partial token
    grids; `gr.skip()` keeps the gallery between them) with the token count, then the final images."""
    try:
        (class_id,) = pipe.get_label_ids(class_label)
    except (TypeError, ValueError) as error:
        raise gr.Error(str(error))
    if seed is None or seed < 0 or seed != int(seed):
        raise gr.Error(f"The seed must be a whole number >= 0, got {seed}.")
    num_images, seed = int(num_images), int(seed)
    seq_len = pipe.transformer.config.image_seq_len
    preview_every = max(1, seq_len // NUM_PREVIEWS)
    events = queue.Queue()
    stop = threading.Event()

    # Runs in the generation thread after each token: decoding there keeps the previews in step with the tokens
    # (and off the CPU cores while the next token is being computed).
    def on_step_end(pipe, step, timestep, callback_kwargs):
        done = step + 1
        preview = None
        if done % preview_every == 0 and done < seq_len:
            preview = pipe.decode_partial(callback_kwargs["tokens"])
        events.put(("step", done, preview))
        if stop.is_set():  # the page was closed: stop after this token
            pipe._interrupt = True
        return {}

    def run():
        try:
            images = pipe(
                class_label,
                num_images_per_prompt=num_images,
                guidance_scale=float(guidance_scale),
                temperature=float(temperature),
                generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["tokens"],
            ).images
            events.put(("done", images))
        except Exception as error:  # handed to the request thread, which reports it in the page
            events.put(("error", error))

    worker = threading.Thread(target=run, name="rar-generate", daemon=True)
    yield gr.skip(), progress_text(0, seq_len)
    worker.start()
    try:
        while True:
            done, preview = None, None
            for kind, *payload in _waiting_events(events):
                if kind == "error":
                    raise gr.Error(f"Generation failed: {payload[0]}")
                if kind == "done":
                    if class_id is None:
                        what = f"{num_images} unconditional image(s)"
                    else:
                        what = f"{num_images} image(s) of class {class_id} ({pipe.id2label[class_id]})"
                    yield payload[0], f"Done: {what}, seed {seed}."
                    return
                done = payload[0]
                if payload[1] is not None:
                    preview = payload[1]
            yield (gr.skip() if preview is None else preview), progress_text(done, seq_len)
    finally:
        stop.set()
        worker.join()


def build_demo(pipe: RARPipeline, title: str = "RAR") -> gr.Blocks:
    choices = class_choices(pipe.id2label)

    def generate(class_label, num_images, guidance_scale, temperature, seed):
        yield from generate_images(pipe, class_label, num_images, guidance_scale, temperature, seed)

    defaults = pipe.transformer.generation_config
    with gr.Blocks(title=title, **({} if STYLE_IN_LAUNCH else STYLE)) as demo:
        gr.Markdown(f"# {title}\nClass-conditional image generation with RAR, one image token at a time.")
        with gr.Tab("Generate", elem_id="generate-tab"):
            with gr.Row():
                with gr.Column(scale=1):
                    # Typed text that is not an entry goes to the pipeline as is (another synonym of a class name,
                    # "none"); a name it does not know gets its error, which suggests close names.
                    class_picker = gr.Dropdown(
                        choices, value=choices[0][1], label="Class (type to search)", allow_custom_value=True,
                        elem_id="class-picker",
                    )
                    num_images = gr.Slider(
                        1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="num-images"
                    )
                    guidance_scale = gr.Slider(
                        1.0, 10.0, value=defaults.guidance_scale, step=0.1, label="Guidance scale", elem_id="guidance"
                    )
                    temperature = gr.Slider(
                        0.1, 2.0, value=defaults.temperature, step=0.01, label="Temperature", elem_id="temperature"
                    )
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery", **GALLERY_KWARGS)
                    status = gr.Markdown(elem_id="status")
            # "minimal": the queue position and the timer in a corner, never an overlay over the images.
            button.click(
                generate, [class_picker, num_images, guidance_scale, temperature, seed], [gallery, status],
                show_progress="minimal",
            )
        inpainting_tab(pipe)
    return demo


# ------------------------------------------------------------------------------------------------ inpainting tab
INPAINT_HELP = (
    "Upload an image, or make one of a class, then paint over the part to regenerate: the painted tokens are generated "
    "anew for the class you pick, the rest of the image is kept (a token is regenerated when any pixel of its patch is "
    "painted). The completions are exactly `pipe(class, image=image, mask_image=mask, num_images_per_prompt=n, "
    "guidance_scale=g, generator=torch.Generator().manual_seed(seed))` with the painted strokes as the white mask."
)


# The "what the model keeps" view is scaled up (nearest) by a whole factor to at least this many pixels.
KEPT_VIEW_SIZE = 256


def editor_image_and_mask(value) -> tuple:
    """The image and the mask of a `gr.ImageEditor` value: its background, and white wherever a layer holds paint (the
    layers are the size of the canvas, which the pipeline resizes like any mask)."""
    import numpy as np
    from PIL import Image

    background = (value or {}).get("background")
    if background is None:
        raise gr.Error("Upload an image (or make one with the button) first, then paint over the part to regenerate.")
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    size = layers[0].size if layers else background.size
    painted = np.zeros(size[::-1], dtype=bool)
    for layer in layers:
        painted |= np.asarray(layer.convert("RGBA").resize(size, Image.Resampling.NEAREST))[..., 3] > 0
    if not painted.any():
        raise gr.Error("Paint over the part of the image to regenerate first (nothing is painted).")
    return background.convert("RGB"), Image.fromarray(painted.astype(np.uint8) * 255)


def inpaint_images(pipe: RARPipeline, value, class_index, num_images, guidance_scale, seed):
    """`(kept, completions, status)`: what the model keeps of the image (its kept tokens decoded, mid-gray where
    regenerated, scaled up to `KEPT_VIEW_SIZE`), the completions, and a line saying what was done."""
    from PIL import Image

    if class_index is None:
        raise gr.Error("Pick a class first.")
    if seed is None or seed < 0 or seed != int(seed):
        raise gr.Error(f"The seed must be a whole number >= 0, got {seed}.")
    image, mask = editor_image_and_mask(value)
    class_id, num_images, seed = int(class_index), int(num_images), int(seed)
    try:
        output = pipe(
            class_id, image=image, mask_image=mask, num_images_per_prompt=num_images,
            guidance_scale=float(guidance_scale), generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        raise gr.Error(f"Inpainting failed: {error}")
    keep = pipe.prepare_mask(mask)[1]
    codes = pipe.vqvae.encode(pipe.prepare_image(image).to(pipe.vqvae.device, pipe.vqvae.dtype)).indices
    kept = pipe.decode_partial(torch.where(keep.to(codes.device), codes, -1))[0]
    zoom = max(1, KEPT_VIEW_SIZE // max(kept.size))  # shown large, in whole pixels
    kept = kept.resize((kept.width * zoom, kept.height * zoom), Image.Resampling.NEAREST)
    regenerated, total = int((~keep).sum()), keep.shape[1]
    name = pipe.id2label[class_id]
    status = (f"Done: regenerated {regenerated} of {total} tokens, {num_images} completion(s) of class {class_id} "
              f"({name}), seed {seed}.")  # fmt: skip
    return kept, output.images, status


def start_image(pipe: RARPipeline, class_index, seed):
    """An image of the class to paint on: `pipe(class, generator=torch.Generator().manual_seed(seed))`, at the model's
    size (the editor zooms in on small images)."""
    if class_index is None:
        raise gr.Error("Pick a class first.")
    seed = 0 if seed is None or seed < 0 else int(seed)
    return pipe(int(class_index), generator=torch.Generator().manual_seed(seed)).images[0]


def inpainting_tab(pipe: RARPipeline):
    """The "Inpaint" tab (built inside the demo's Blocks): paint a mask on an uploaded or generated image and complete
    it with the pipeline (`pipe(..., image=, mask_image=)`)."""
    choices = [(f"{i}: {pipe.id2label[i]}", i) for i in range(len(pipe.id2label))]
    defaults = pipe.transformer.generation_config
    with gr.Tab("Inpaint", elem_id="inpaint-tab"):
        gr.HTML("<style>#inpaint-gallery img, #inpaint-kept img { image-rendering: pixelated; }</style>")
        gr.Markdown(INPAINT_HELP)
        with gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(
                    type="pil", label="Image: paint over the part to regenerate", sources=["upload", "clipboard"],
                    # about a token wide on an image of the model's size (the "Brush Size" control changes it)
                    brush=gr.Brush(default_size=max(2, pipe.image_size[0] // 8), colors=["#ff00ff"], color_mode="fixed"),
                    layers=False, transforms=(),
                    elem_id="inpaint-editor", **GALLERY_KWARGS,
                )  # fmt: skip
                class_picker = gr.Dropdown(choices, value=0, label="Class", elem_id="inpaint-class")
                make = gr.Button("Make an image of this class", elem_id="inpaint-make")
                num_images = gr.Slider(1, MAX_IMAGES, value=3, step=1, label="Completions", elem_id="inpaint-num-images")
                guidance_scale = gr.Slider(
                    1.0, 10.0, value=defaults.guidance_scale, step=0.1, label="Guidance scale", elem_id="inpaint-guidance"
                )
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="inpaint-seed")
                button = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
            with gr.Column(scale=2):
                kept = gr.Image(label="What the model keeps (gray: regenerated)", type="pil", interactive=False,
                                elem_id="inpaint-kept", **GALLERY_KWARGS)  # fmt: skip
                gallery = gr.Gallery(label="Completions", columns=4, elem_id="inpaint-gallery", **GALLERY_KWARGS)
                status = gr.Markdown(elem_id="inpaint-status")
        make.click(lambda c, s: start_image(pipe, c, s), [class_picker, seed], [editor])
        button.click(
            lambda v, c, n, g, s: inpaint_images(pipe, v, c, n, g, s),
            [editor, class_picker, num_images, guidance_scale, seed], [kept, gallery, status],
        )  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get("RAR_HF_MODEL") or str(DEFAULT_MODEL),
        help="Hub repo id or local folder of a RARPipeline (default: $RAR_HF_MODEL, else the shipped tiny-digits one).",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device (default: cuda if available)."
    )
    parser.add_argument("--host", default=None, help="Address to listen on (default: gradio's, $GRADIO_SERVER_NAME).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: gradio's, $GRADIO_SERVER_PORT).")
    return parser.parse_args(argv)


def main(argv=None, block: bool = True) -> gr.Blocks:
    """Serve the demo; with `block=False`, return the running demo at once (`demo.close()` stops it)."""
    args = parse_args(argv)
    try:
        pipe = RARPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        sys.exit(f"app.py: cannot load a RARPipeline from --model {args.model!r}: {error}")
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)  # the page shows the progress
    title = "RAR tiny digits" if Path(args.model) == DEFAULT_MODEL else f"RAR: {args.model}"
    demo = build_demo(pipe, title=title)
    # One generation at a time: they share the model (and would only split the same cores).
    demo.queue().launch(
        server_name=args.host, server_port=args.port, prevent_thread_lock=not block,
        **(STYLE if STYLE_IN_LAUNCH else {}),
    )
    return demo


if __name__ == "__main__":
    main()
