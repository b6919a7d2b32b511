r"""Generate class-conditional samples with a RARPipeline: a labelled grid (one row per class) and/or one PNG each.

    # the shipped tiny-digits pipeline, every digit (offline)
    rar-hf generate --output_path outputs/digits.png
    # two digits by name and id, and unconditional samples
    rar-hf generate --class_labels seven 3 none --num_images_per_label 4 --seed 1
    # a converted official model, one PNG per image
    rar-hf generate --model org/rar-xl --class_labels 207 "tabby cat" --device cuda --output_dir samples/

Class labels are ids (`207`), names (`"white shark"`, any comma-separated synonym of the model's `id2label`) or
`none` / `-1` for unconditional samples. The grid's cells are upscaled (nearest neighbour) to at least 64 pixels and
each row is labelled with its class name.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ._loading import finite_float, load_pipeline, positive_int

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "tiny-digits"
# A few ImageNet classes that read well in a grid: golden retriever, otter, lesser panda, geyser.
IMAGENET_SHOWCASE = [207, 360, 387, 974]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNCONDITIONAL = ("none", "-1")
MIN_CELL = 64
GAP = 4


def add_arguments(parser):
    from ..generation_rar import GUIDANCE_SCHEDULES

    parser.add_argument(
        "--model",
        default=None,
        help=f"Hub repo id or local folder of a RARPipeline (default: the shipped tiny-digits one, {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--class_labels",
        nargs="+",
        default=None,
        help="Class ids or names (quote names with spaces); `none` or `-1` for unconditional samples. Default: every "
        "class if the model has at most 10, else a few.",
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
        "--output_path", default=None, help="Where to write the PNG grid (default: outputs/samples.png, unless "
        "--output_dir is given)."
    )
    parser.add_argument(
        "--output_dir", default=None, help="Also write every image as its own PNG here: {row}_{class}_{index}.png."
    )


def check_args(args):
    if args.output_path is None and args.output_dir is None:
        args.output_path = "outputs/samples.png"
    for flag in ("output_path", "output_dir"):
        value = getattr(args, flag)
        if value is None:
            continue
        path = Path(value)
        if flag == "output_dir" and path.exists() and not path.is_dir():
            raise ValueError(f"--output_dir {value} is a file, expected a folder")
        if flag == "output_path" and path.is_dir():
            raise ValueError(f"--output_path {value} is a folder, expected a .png file path")


def parse_labels(labels: list[str]) -> list:
    """Command-line strings -> pipeline labels: digits are ids, `none`/`-1` unconditional, anything else a name."""
    parsed = []
    for label in labels:
        if label.strip().lower() in UNCONDITIONAL:
            parsed.append(None)
        elif label.lstrip("-").isdigit():
            parsed.append(int(label))  # a negative id other than -1 is range-checked (and rejected) by the pipeline
        else:
            parsed.append(label)
    return parsed


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
            raise ValueError(
                f"the default tiny-digits pipeline is not in this installation (expected {DEFAULT_MODEL}); "
                "pass --model <Hub repo id or pipeline folder>"
            )
        model = str(DEFAULT_MODEL)
    pipe = load_pipeline(model, dtype=DTYPES[args.dtype]).to(args.device)

    labels = parse_labels(args.class_labels) if args.class_labels else default_labels(pipe.transformer.config.num_classes)
    class_ids = pipe.get_label_ids(labels)  # resolved before sampling, so a typo fails fast, with suggestions
    print("classes:", ", ".join(f"{i} ({row_name(pipe, i)})" if i is not None else "unconditional" for i in class_ids))

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipe(
        class_labels=class_ids,
        num_images_per_prompt=args.num_images_per_label,
        guidance_scale=args.guidance_scale,
        guidance_schedule=args.guidance_schedule,
        guidance_scale_pow=args.guidance_scale_pow,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
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
        labelled_grid(rows, [row_name(pipe, i) for i in class_ids]).save(output_path)
        print(output_path)


def parse_args(argv=None):
    from ..cli import ArgumentParser

    parser = ArgumentParser(description=__doc__)
    add_arguments(parser)
    return parser.parse_args(argv)
