r"""Generate class-conditional samples with a RARPipeline: a labelled grid (one row per class) and/or one PNG each.

    # the shipped tiny-digits pipeline, every digit (offline)
    rar-hf generate --output_path outputs/digits.png
    # two digits by name and id, and unconditional samples
    rar-hf generate --class_labels seven 3 none --num_images_per_label 4 --seed 1
    # a converted official model, one PNG per image
    rar-hf generate --model org/rar-xl --class_labels 207 "tabby cat" --device cuda --output_dir samples/

Class labels are ids (`207`), names (`"white shark"`, any comma-separated synonym of the model's `id2label`) or
`none` / `unconditional` / `-1` for unconditional samples: each is looked up by the pipeline's `get_label_ids`, as in
Python. The grid's cells are upscaled (nearest neighbour) to at least 64 pixels and each row is labelled with its
class name.

Speculative decoding (the same images in distribution, fewer forward passes; see README "Speculative decoding"):

    rar-hf generate --jacobi_window 8
    rar-hf generate --model org/rar-xl --assistant_model org/rar-b --num_assistant_tokens 4 --device cuda
    rar-hf generate --jacobi_window 8 --acceptance relaxed --relax 2   # faster, no longer exact

The options reach the pipeline call under the same names (`pipe(..., jacobi_window=8)`).

Inpainting (image completion; see README "Inpainting"): the black part of the mask keeps the image's tokens, the white
part is generated anew for each class. Both files are resized to the model's size; the mask is read in one channel,
binarized at 0.5, and a token is regenerated when any pixel of its patch is white. The grid's first row shows the
input as the model reads it and what it keeps (mid-gray: the regenerated tokens).

    rar-hf generate --image digit.png --mask_image bottom-half.png --class_labels 3 8 --num_images_per_label 4
"""

import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..arguments import UserError, check_writable, finite_float, positive_int
from ..quantization import QUANTIZATION_TYPES, pipeline_quantization_config
from ._loading import load_pipeline, load_transformer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "tiny-digits"
# A few ImageNet classes that read well in a grid: golden retriever, otter, lesser panda, geyser.
IMAGENET_SHOWCASE = [207, 360, 387, 974]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The pipeline call's speculative options, under the same names as the flags.
SPECULATIVE_OPTIONS = ("jacobi_window", "assistant_model", "num_assistant_tokens", "acceptance", "relax")
MIN_CELL = 64
GAP = 4


def add_arguments(parser):
    from ..generation_rar import GUIDANCE_SCHEDULES
    from ..speculative_rar import ACCEPTANCE_RULES

    parser.add_argument(
        "--model",
        default=None,
        help=f"Hub repo id or local folder of a RARPipeline (default: the shipped tiny-digits one, {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--class_labels",
        nargs="+",
        default=None,
        help="Class ids or names (quote names with spaces); `none`, `unconditional` or `-1` for unconditional samples. "
        "Default: every class if the model has at most 10, else a few.",
    )
    parser.add_argument(
        "--num_images_per_prompt",
        "--num_images_per_label",
        dest="num_images_per_label",
        type=positive_int,
        default=8,
        help="Images per class (one grid row each).",
    )
    parser.add_argument("--guidance_scale", type=finite_float, default=None, help="Guidance scale (default: the model's).")
    parser.add_argument(
        "--guidance_scale_pow", type=finite_float, default=None, help="Pow-cosine schedule exponent (default: the model's)."
    )
    parser.add_argument(
        "--guidance_schedule", default="pow-cosine", choices=GUIDANCE_SCHEDULES, help="How guidance grows over tokens."
    )
    parser.add_argument("--temperature", type=finite_float, default=None, help="Sampling temperature (default: the model's).")
    parser.add_argument("--top_k", type=int, default=None, help="Sample among the k most likely tokens (default: all).")
    parser.add_argument("--top_p", type=finite_float, default=None, help="Nucleus sampling threshold (default: off).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed: the same seed gives the same images.")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device (default: cuda if available)."
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Compute dtype of the models.")
    parser.add_argument(
        "--quantize", default=None, choices=QUANTIZATION_TYPES, help="Quantize the transformer's linear layers with "
        "torchao as it loads: int8 (weights), int8-dynamic (weights and activations) or int4 (weights); needs "
        'pip install "rar-hf[quantization]". See README "Quantized inference" for what each does to speed and quality.'
    )
    parser.add_argument(
        "--output_path", default=None, help="Where to write the PNG grid (default: outputs/samples.png, unless "
        "--output_dir is given)."
    )
    parser.add_argument(
        "--output_dir", default=None, help="Also write every image as its own PNG here: {row}_{class}_{index}.png."
    )
    inpainting = parser.add_argument_group("inpainting (passed to the pipeline call as image= and mask_image=)")
    inpainting.add_argument(
        "--image", default=None, help="An image to complete (any size; resized to the model's): its tokens are kept "
        "where --mask_image is black."
    )
    inpainting.add_argument(
        "--mask_image", default=None, help="The mask of --image: white = regenerate, black = keep (one channel, "
        "binarized at 0.5; resized to the model's size). A token is regenerated when any pixel of its patch is white."
    )
    speculative = parser.add_argument_group("speculative decoding (passed to the pipeline call under the same names)")
    speculative.add_argument(
        "--jacobi_window", type=positive_int, default=None, help="Speculative Jacobi decoding guessing this many tokens "
        "per forward pass (training-free, exact)."
    )
    speculative.add_argument(
        "--assistant_model", default=None, help="A smaller RAR that drafts tokens (exact speculative sampling): a "
        "RARForImageGeneration folder, a RARPipeline folder (its transformer/ is used) or a Hub id. It must share the "
        "model's codebook and classes."
    )
    speculative.add_argument(
        "--num_assistant_tokens", type=positive_int, default=None, help="Tokens the assistant drafts per round "
        "(default: the pipeline's, 4)."
    )
    speculative.add_argument(
        "--acceptance", default=None, choices=ACCEPTANCE_RULES, help="How drafts are accepted: lossless (the default: "
        "the images follow the model's distribution exactly) or relaxed (more drafts kept, faster, not exact)."
    )
    speculative.add_argument(
        "--relax", type=finite_float, default=None, help="With --acceptance relaxed: accept drafts this many times more "
        "readily (>= 1; default: the pipeline's, 2)."
    )


def check_args(args):
    """Every flag and path check that needs no model: run before anything is loaded or generated."""
    if args.output_path is None and args.output_dir is None:
        args.output_path = "outputs/samples.png"
    if args.output_path is not None:
        check_writable(args.output_path, "--output_path")
    if args.output_dir is not None:
        check_writable(args.output_dir, "--output_dir", folder=True)
    if args.jacobi_window is not None and args.assistant_model is not None:
        raise UserError("--jacobi_window and --assistant_model are two kinds of speculative decoding: pass one")
    if args.num_assistant_tokens is not None and args.assistant_model is None:
        raise UserError("--num_assistant_tokens needs --assistant_model (the model that drafts them)")
    if args.jacobi_window is None and args.assistant_model is None:
        for flag in ("acceptance", "relax"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} applies to speculative decoding: add --jacobi_window or --assistant_model")
    if args.relax is not None and args.acceptance != "relaxed":
        raise UserError("--relax applies to --acceptance relaxed only (lossless acceptance has no relax factor)")
    if args.relax is not None and args.relax < 1:
        raise UserError(f"--relax must be >= 1 (1 is the lossless rule), got {args.relax}")
    if (args.image is None) != (args.mask_image is None):
        given, missing = ("--image", "--mask_image") if args.mask_image is None else ("--mask_image", "--image")
        raise UserError(f"{given} needs {missing}: inpainting keeps the image where the mask is black")
    args.inpainting = None
    if args.image is not None:
        args.inpainting = {"image": read_image(args.image, "--image"), "mask_image": read_image(args.mask_image, "--mask_image")}


def read_image(path, flag: str) -> Image.Image:
    """The image file of `flag`, decoded (RGB), or one clear line saying why it cannot be read."""
    from diffusers.utils import load_image

    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return load_image(str(path))
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path} is not an image PIL can read ({error})") from None


def label_values(labels: list[str]) -> list[int | str]:
    """Command-line strings as `get_label_ids` takes them in Python: integers as ints, anything else as the string."""
    return [int(label) if re.fullmatch(r"\s*-?\d+\s*", label) else label for label in labels]


def default_labels(num_classes: int) -> list[int]:
    if num_classes <= 10:
        return list(range(num_classes))
    return IMAGENET_SHOWCASE if num_classes == 1000 else list(range(4))


def row_name(pipe, class_id) -> str:
    return "unconditional" if class_id is None else pipe.id2label[class_id]


def labelled_grid(rows: list[list[Image.Image]], names: list[str], min_cell: int = MIN_CELL, gap: int = GAP):
    """One row of images per name: cells upscaled (nearest) to >= `min_cell` px, `gap` px apart, name on the left."""
    width, height = rows[0][0].size
    scale = max(1, -(-min_cell // min(width, height)))  # integer factor: every source pixel becomes a square
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(name, font=font)) for name in names) + 2 * gap
    cols = max(len(row) for row in rows)
    grid = Image.new(
        "RGB", (label_w + cols * (cell_w + gap) + gap, len(rows) * (cell_h + gap) + gap), color=(255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for r, (row, name) in enumerate(zip(rows, names)):
        top = gap + r * (cell_h + gap)
        _, text_top, _, text_bottom = draw.textbbox((0, 0), name, font=font)
        draw.text((gap, top + (cell_h - (text_bottom - text_top)) // 2 - text_top), name, fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            cell = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(cell, (label_w + c * (cell_w + gap), top))
    return grid


def main(args):
    check_args(args)
    model = args.model
    if model is None:
        if not DEFAULT_MODEL.is_dir():
            raise UserError(
                f"the default tiny-digits pipeline is not in this installation (expected {DEFAULT_MODEL}); "
                "pass --model <Hub repo id or pipeline folder>"
            )
        model = str(DEFAULT_MODEL)
    quantization = {}
    if args.quantize is not None:  # checked to run here before anything loads; quantized where it will run
        config = pipeline_quantization_config(args.quantize, args.device, DTYPES[args.dtype])
        quantization = {"quantization_config": config, "device_map": args.device}
    pipe = load_pipeline(model, dtype=DTYPES[args.dtype], **quantization).to(args.device)
    speculative = {name: getattr(args, name) for name in SPECULATIVE_OPTIONS if getattr(args, name) is not None}
    if args.assistant_model is not None:
        speculative["assistant_model"] = load_transformer(
            args.assistant_model, "--assistant_model", dtype=DTYPES[args.dtype]
        ).to(args.device)

    labels = label_values(args.class_labels) if args.class_labels else default_labels(pipe.transformer.config.num_classes)
    class_ids = pipe.get_label_ids(labels)  # resolved before sampling, so a typo fails fast, with suggestions
    print("classes:", ", ".join(f"{i} ({row_name(pipe, i)})" if i is not None else "unconditional" for i in class_ids))

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    inpainting = args.inpainting or {}
    images = pipe(
        class_labels=class_ids,
        **inpainting,
        num_images_per_prompt=args.num_images_per_label,
        guidance_scale=args.guidance_scale,
        guidance_schedule=args.guidance_schedule,
        guidance_scale_pow=args.guidance_scale_pow,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        **speculative,
    ).images

    n = args.num_images_per_label
    rows = [images[r * n : (r + 1) * n] for r in range(len(class_ids))]
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for r, (row, class_id) in enumerate(zip(rows, class_ids)):
            for i, image in enumerate(row):
                image.save(output_dir / f"{r:02d}_{'none' if class_id is None else class_id}_{i:03d}.png")
        print(f"{output_dir} ({len(images)} PNGs)")
    if args.output_path is not None:
        output_path = Path(args.output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        names = [row_name(pipe, i) for i in class_ids]
        if inpainting:
            rows, names = [inpainting_inputs(pipe, **inpainting), *rows], ["input, kept", *names]
        labelled_grid(rows, names).save(output_path)
        print(output_path)


def inpainting_inputs(pipe, image, mask_image) -> list[Image.Image]:
    """The input as the pipeline reads it (resized), and what it keeps: the input, mid-gray where tokens are
    regenerated (a white mask would not show on the grid's white background)."""
    pixels = pipe.prepare_image(image)
    height, width = pipe.transformer.config.latent_size
    keep = pipe.prepare_mask(mask_image)[1].view(1, 1, height, width).float()
    keep = torch.nn.functional.interpolate(keep, size=pixels.shape[-2:], mode="nearest")
    kept = pixels * keep + 0.5 * (1 - keep)
    return pipe.numpy_to_pil(torch.cat([pixels, kept]).permute(0, 2, 3, 1).numpy())

