#!/usr/bin/env python
"""Turn the pipeline that train_rar.py wrote into a packaged tiny-digits folder: digit names, a model card with the
training recipe and the measured quality (benchmarks/digits_quality.py JSON).

The shipped default (src/rar_hf/pretrained/tiny-digits) is replaced only with --replace_shipped (`make tiny-digits
INSTALL=1`); any other existing folder only if it holds a pipeline (a previous package)."""

import json
import shutil
from pathlib import Path

import rar_hf
from rar_hf import RARPipeline
from rar_hf.arguments import ArgumentParser, UserError, run_script
from rar_hf.model_card import write_model_card
from rar_hf.run_folder import describe_folder, folder_kind, list_checkpoints

SHIPPED = Path(rar_hf.__file__).resolve().parent / "pretrained" / "tiny-digits"

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--pipeline", required=True, help="Folder written by train_rar.py (model_index.json, transformer/, vqvae/).")
    p.add_argument("--output_dir", required=True, help="Folder to write (a previous package there is replaced).")
    p.add_argument("--replace_shipped", action="store_true", help=f"Allow --output_dir to be the shipped default {SHIPPED}.")
    p.add_argument("--quality_json", default=None, help="Output of benchmarks/digits_quality.py --output_json.")
    p.add_argument("--recipe", default="make tiny-digits", help="Command that produced the model.")
    p.add_argument("--seconds", type=float, default=None, help="Wall time of the recipe, for the card.")
    return p.parse_args(argv)


def check_output_dir(output_dir: Path, replace_shipped: bool) -> None:
    if output_dir.resolve() == SHIPPED and not replace_shipped:
        raise UserError(
            f"--output_dir {output_dir} is the shipped default model: pass --replace_shipped (make tiny-digits "
            "INSTALL=1) to replace it, or write elsewhere (make tiny-digits writes to outputs/)."
        )
    if not output_dir.exists():
        return
    if folder_kind(output_dir) != "pipeline" and any(output_dir.iterdir()):
        raise UserError(f"--output_dir {output_dir} {describe_folder(output_dir)}, not a pipeline to replace: choose another folder.")
    if list_checkpoints(output_dir) or (output_dir / "metrics.jsonl").exists():
        raise UserError(f"--output_dir {output_dir} is a training run's folder (it would be deleted): choose another folder.")


def main(args):
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, args.replace_shipped)
    pipe = RARPipeline.from_pretrained(args.pipeline)
    pipe = RARPipeline(pipe.transformer, pipe.vqvae, id2label={i: f"{i}, {name}" for i, name in enumerate(DIGIT_NAMES)})
    if output_dir.exists():
        shutil.rmtree(output_dir)
    pipe.save_pretrained(output_dir)
    config = pipe.transformer.config
    training = {
        "data": "scikit-learn load_digits (1,437 training digits of the stratified 80/20 split, seed 0), "
        "upscaled to 32x32 RGB",
        "recipe": f"`{args.recipe}` (examples/tiny_digits/train_tiny_digits.sh): MaskGIT-VQGAN tokenizer "
        "(down-sampling 4, 8x8 = 64 tokens) trained by examples/train_vqgan.py, pre-tokenised by "
        "examples/pretokenize.py, RAR trained by examples/train_rar.py with the annealed random-order schedule",
        "generator": f"{sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f}M parameters, width "
        f"{config.hidden_size}, {config.num_hidden_layers} layers",
    }
    if args.seconds is not None:
        training["wall_time"] = f"{args.seconds / 60:.1f} minutes on 2 CPU cores"
    if args.quality_json:
        quality = json.loads(Path(args.quality_json).read_text())
        lines = [f"real held-out digits: classifier accuracy {quality['real']['accuracy']:.3f}"]
        own = [row for row in quality["generated"] if Path(row["model"]).resolve() == Path(args.pipeline).resolve()]
        for row in own:
            lines.append(
                f"constant guidance {row['guidance_scale']:g}: class-conditional accuracy {row['accuracy']:.3f}, "
                f"Frechet distance to held-out digits {row['frechet']:.3f}"
            )
        training["measured_quality"] = "; ".join(lines) + " (benchmarks/digits_quality.py)"
    write_model_card(output_dir, config, training=training)
    size = sum(f.stat().st_size for f in output_dir.rglob("*") if f.is_file())
    print(f"Wrote {output_dir} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run_script(main, parse_args())
