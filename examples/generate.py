"""Generate a grid of class-conditional samples with a RAR pipeline: one row per class.

    # the shipped tiny-digits pipeline, every digit
    python examples/generate.py
    # a converted official model, two ImageNet classes
    python examples/generate.py --model org/rar-xl --class_labels 207 "tabby cat" --num_images_per_label 4 --device cuda
"""

import argparse
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

import rar_hf
from rar_hf import GUIDANCE_SCHEDULES
from rar_hf.pipeline_rar import RARPipeline

DEFAULT_MODEL = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"
# A few ImageNet classes that read well in a grid: golden retriever, otter, lesser panda, geyser.
IMAGENET_SHOWCASE = [207, 360, 387, 974]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hub repo id or local folder of a RARPipeline (default: the shipped tiny-digits one, {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--class_labels",
        nargs="+",
        default=None,
        help="Class ids or names (quote names with spaces). Default: every class if the model has at most 10, "
        "else a few.",
    )
    parser.add_argument("--num_images_per_label", type=int, default=8, help="Images per class (one grid row each).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Guidance scale (default: the model's).")
    parser.add_argument(
        "--guidance_scale_pow", type=float, default=None, help="Pow-cosine schedule exponent (default: the model's)."
    )
    parser.add_argument(
        "--guidance_schedule", default="pow-cosine", choices=GUIDANCE_SCHEDULES, help="How guidance grows over tokens."
    )
    parser.add_argument("--temperature", type=float, default=None, help="Sampling temperature (default: the model's).")
    parser.add_argument("--top_k", type=int, default=None, help="Sample among the k most likely tokens (default: all).")
    parser.add_argument("--top_p", type=float, default=None, help="Nucleus sampling threshold (default: off).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed: the same seed gives the same grid.")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device (default: cuda if available)."
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Compute dtype of the models.")
    parser.add_argument("--output_path", default="outputs/samples.png", help="Where to write the PNG grid.")
    return parser.parse_args(argv)


def default_labels(num_classes: int) -> list[int]:
    if num_classes <= 10:
        return list(range(num_classes))
    return IMAGENET_SHOWCASE if num_classes == 1000 else list(range(4))


def main(argv=None):
    args = parse_args(argv)
    model = args.model
    if model is None:
        if not DEFAULT_MODEL.is_dir():
            raise SystemExit(
                f"The default tiny-digits pipeline is not in this installation (expected {DEFAULT_MODEL}). "
                "Pass --model <Hub repo id or pipeline folder>."
            )
        model = str(DEFAULT_MODEL)
    pipe = RARPipeline.from_pretrained(model, dtype=DTYPES[args.dtype]).to(args.device)

    # Command-line labels are strings: digits are ids, anything else a class name.
    labels = args.class_labels or default_labels(pipe.transformer.config.num_classes)
    labels = [int(label) if isinstance(label, str) and label.isdigit() else label for label in labels]
    try:  # resolved before sampling, so a typo fails fast, with suggestions
        class_ids = pipe.get_label_ids(labels)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    print("classes:", ", ".join(f"{i} ({pipe.id2label[i]})" for i in class_ids))

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

    grid = make_image_grid(images, rows=len(class_ids), cols=args.num_images_per_label)
    output_path = Path(args.output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output_path)
    print(output_path)


if __name__ == "__main__":
    main()
