"""Inpainting on the shipped tiny-digits model: how well completions of held-out digits score, and what they cost.

Quality. Every held-out digit of the split the model was trained on (`rar_hf.data.digits`, 360 images it never saw)
is masked four ways, white = regenerate: the bottom half (the kept tokens are a raster prefix), the right half, a
centre box (16x16 of the 32x32 pixels, 16 of the 64 tokens) and a random half of the tokens (32 per image, drawn per
image). Each is completed through `RARPipeline(image=, mask_image=)` with its true label and with a wrong label (drawn
uniformly among the nine others), one generator per image. The judge is `benchmarks/digits_quality.py`'s: an SVC
trained on the real training digits (accuracy = the classifier names the true label; "follows label" = it names the
label the completion was asked for) and the Frechet distance of PCA-16 features against the held-out real digits.
Reference rows: the real digits, their VQ reconstructions (a mask that keeps everything), the kept part alone (the
regenerated area black, the background colour) and full generations with the true label (a mask that keeps nothing).

Speed. Completing half an image runs half the decoding steps: forward passes of the transformer per pipeline call
(counted with a hook) and wall-clock (median of `--repeats` passes, the settings taking turns within each pass), for a
full image, the bottom half (a raster prefix of 32 tokens), a random half (32 tokens per row), and random masks whose
rows keep different numbers of tokens (their extra kept tokens cost one step each).

    python benchmarks/inpainting.py --sections quality --output_json outputs/inpainting-quality.json    # ~6 min, 2 cores
    flock /tmp/rar-cpu.lock python benchmarks/inpainting.py --sections speed --threads 2 \
        --output_json outputs/inpainting-speed.json                                                    # ~1 min
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_quality import SHIPPED, DigitsJudge  # noqa: E402

from rar_hf import RARPipeline  # noqa: E402
from rar_hf.data.digits import digits_to_images, images_to_digits, split_digits  # noqa: E402

MASK_KINDS = ("bottom-half", "right-half", "centre-box", "random-50%")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHIPPED), help="Pipeline folder (default: the shipped tiny digits).")
    p.add_argument("--num_images", type=int, default=None, help="Held-out digits to complete (default: all 360).")
    p.add_argument("--seeds", type=int, default=3, help="Sampling seeds of the quality rows (mean and range reported).")
    p.add_argument("--guidance_scale", type=float, default=None, help="Guidance scale (default: the model's).")
    p.add_argument("--batch_size", type=int, default=120, help="Images per pipeline call (quality).")
    p.add_argument("--speed_batch_sizes", type=int, nargs="*", default=[1, 10], help="Batch sizes timed (none: skip).")
    p.add_argument("--repeats", type=int, default=7, help="Timed passes per setting (median).")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    p.add_argument("--sections", nargs="+", choices=("quality", "speed"), default=["quality", "speed"],
                   help="What to measure (time the speed section alone, under the CPU lock).")
    p.add_argument("--output_json", default=None, help="Also write the results here.")
    return p.parse_args(argv)


def regenerated_tokens(kind: str, count: int, grid: tuple[int, int], rng: np.random.Generator) -> torch.BoolTensor:
    """`(count, h * w)` booleans, True where the token is regenerated."""
    height, width = grid
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    if kind == "bottom-half":
        mask = rows >= height // 2
    elif kind == "right-half":
        mask = cols >= width // 2
    elif kind == "centre-box":
        mask = (abs(rows - (height - 1) / 2) < height / 4) & (abs(cols - (width - 1) / 2) < width / 4)
    elif kind == "random-50%":
        masks = np.zeros((count, height * width), dtype=bool)
        for row in masks:
            row[rng.choice(height * width, size=height * width // 2, replace=False)] = True
        return torch.from_numpy(masks)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    return torch.from_numpy(mask.reshape(1, -1)).expand(count, -1)


def pixel_masks(regenerate: torch.BoolTensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Token masks -> the `(count, 1, H, W)` pixel masks a user would draw (white = regenerate)."""
    masks = regenerate.float().view(-1, 1, *grid)
    return masks.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


def complete(pipe, images, masks, labels, guidance_scale, seed, batch_size):
    """Completions `(N, 3, H, W)` of `images` (PIL list) with `masks` and `labels`, one generator per image."""
    out = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(start, stop)]
        result = pipe([int(label) for label in labels[start:stop]], image=images[start:stop],
                      mask_image=masks[start:stop], guidance_scale=guidance_scale, generator=generators,
                      output_type="pt")  # fmt: skip
        out.append(result.images.float().cpu())
    return torch.cat(out)


def judge_row(judge, name, digits, labels, asked=None) -> dict:
    predicted = judge.classifier.predict(digits)
    row = {"setting": name, "accuracy": float((predicted == labels).mean()), "frechet": judge.frechet(digits)}
    if asked is not None:
        row["follows_label"] = float((predicted == asked).mean())
    return row


def quality(pipe, judge, args) -> list[dict]:
    digits, labels = split_digits()["test"]
    if args.num_images is not None:
        digits, labels = digits[: args.num_images], labels[: args.num_images]
    height, width = pipe.image_size
    images = digits_to_images(digits, height)
    pixels = pipe.prepare_image(images)
    grid = tuple(pipe.transformer.config.latent_size)
    factor = pipe.vqvae.downsample_factor
    count = len(images)
    rows = [judge_row(judge, "held-out digits (the inputs, 32x32 back to 8x8)", images_to_digits(pixels), labels)]
    keep_all = torch.zeros(count, 1, height, width)
    rows.append(judge_row(judge, "VQ reconstruction (mask keeps everything)",
                          images_to_digits(complete(pipe, images, keep_all, labels, args.guidance_scale, 0, args.batch_size)), labels))  # fmt: skip
    for seed in range(args.seeds):
        rows.append({**judge_row(judge, "full generation, true label (mask keeps nothing)", images_to_digits(
            complete(pipe, images, torch.ones(count, 1, height, width), labels, args.guidance_scale, seed, args.batch_size)), labels), "seed": seed})  # fmt: skip
    for kind in MASK_KINDS:
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            regenerate = regenerated_tokens(kind, count, grid, rng)
            masks = pixel_masks(regenerate, grid, factor)
            wrong = (labels + 1 + rng.integers(0, 9, size=count)) % 10
            if seed == 0 or kind == "random-50%":
                kept_only = pixels * (1 - masks)
                rows.append({**judge_row(judge, f"{kind}: kept part only (rest black)", images_to_digits(kept_only), labels), "seed": seed})
            for name, asked in (("true label", labels), ("wrong label", wrong)):
                completed = complete(pipe, images, masks, asked, args.guidance_scale, seed, args.batch_size)
                row = judge_row(judge, f"{kind}: completed, {name}", images_to_digits(completed), labels,
                                asked=asked if name == "wrong label" else None)  # fmt: skip
                rows.append({**row, "seed": seed})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Rows of the same setting (one per seed) -> mean and range."""
    merged = {}
    for row in rows:
        merged.setdefault(row["setting"], []).append(row)
    summary = []
    for setting, group in merged.items():
        entry = {"setting": setting, "seeds": len(group)}
        for key in ("accuracy", "follows_label", "frechet"):
            values = [row[key] for row in group if key in row]
            if values:
                entry[key] = (statistics.fmean(values), min(values), max(values))
        summary.append(entry)
    return summary


def speed(pipe, args) -> list[dict]:
    grid = tuple(pipe.transformer.config.latent_size)
    length = grid[0] * grid[1]
    factor = pipe.vqvae.downsample_factor
    digits, labels = split_digits()["test"]
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    records = []
    try:
        for batch_size in args.speed_batch_sizes:
            images = digits_to_images(digits[:batch_size], pipe.image_size[0])
            class_labels = [int(label) for label in labels[:batch_size]]
            rng = np.random.default_rng(0)
            varied = torch.zeros(batch_size, length, dtype=torch.bool)
            for row, kept in zip(varied, rng.integers(length // 4, 3 * length // 4 + 1, size=batch_size)):
                row[rng.choice(length, size=length - kept, replace=False)] = True
            settings = {
                "full image (no mask)": {},
                "bottom half (raster prefix)": regenerated_tokens("bottom-half", batch_size, grid, rng),
                "random half (32 tokens per row)": regenerated_tokens("random-50%", batch_size, grid, rng),
                "random masks, 16-48 kept per row": varied,
            }
            kwargs = {
                name: {} if not isinstance(mask, torch.Tensor) else
                {"image": images, "mask_image": pixel_masks(mask, grid, factor)}
                for name, mask in settings.items()
            }  # fmt: skip
            encode = "of which: preparing and VQ-encoding the images"
            times = {name: [] for name in [*settings, encode]}
            forwards = {encode: 0}
            for repeat in range(args.repeats + 1):  # the first pass warms up
                for name in settings:
                    generator = torch.Generator().manual_seed(repeat)
                    calls.clear()
                    start = time.perf_counter()
                    pipe(class_labels, generator=generator, output_type="latent", guidance_scale=args.guidance_scale, **kwargs[name])
                    elapsed = time.perf_counter() - start
                    forwards[name] = len(calls)
                    if repeat:
                        times[name].append(elapsed)
                start = time.perf_counter()
                with torch.no_grad():
                    pipe.prepare_mask(kwargs["bottom half (raster prefix)"]["mask_image"])
                    pipe.vqvae.encode(pipe.prepare_image(images))
                if repeat:
                    times[encode].append(time.perf_counter() - start)
            full = statistics.median(times["full image (no mask)"])
            for name in times:
                median = statistics.median(times[name])
                records.append({"batch_size": batch_size, "setting": name, "forwards": forwards[name],
                                "seconds": median, "ratio": median / full})  # fmt: skip
    finally:
        handle.remove()
    return records


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = RARPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.guidance_scale is None:
        args.guidance_scale = pipe.transformer.generation_config.guidance_scale
    judge = DigitsJudge() if "quality" in args.sections else None
    rows = quality(pipe, judge, args) if "quality" in args.sections else []
    summary = summarise(rows)
    print(f"model {args.model}; guidance {args.guidance_scale:g}; torch threads {torch.get_num_threads()}")
    if summary:
        print(f"\nQuality ({len(rows)} runs; rows with a range: mean (min-max) over {args.seeds} seeds)\n")
        print("| setting | accuracy (true label) | follows the asked label | Frechet |")
        print("|---|---|---|---|")
        for entry in summary:
            cells = []
            for key, scale, digits in (("accuracy", 100, 1), ("follows_label", 100, 1), ("frechet", 1, 3)):
                if key not in entry:
                    cells.append("-")
                    continue
                mean, low, high = entry[key]
                unit = "%" if scale == 100 else ""
                text = f"{mean * scale:.{digits}f}{unit}"
                cells.append(text if entry["seeds"] == 1 else f"{text} ({low * scale:.{digits}f}-{high * scale:.{digits}f})")
            print(f"| {entry['setting']} | " + " | ".join(cells) + " |")
    records = speed(pipe, args) if "speed" in args.sections else []
    if records:
        print(f"\nSpeed (pipeline call, output_type='latent', median of {args.repeats})\n")
        print("| batch | setting | transformer forwards | seconds | vs full image |")
        print("|---|---|---|---|---|")
        for record in records:
            print(f"| {record['batch_size']} | {record['setting']} | {record['forwards']} | {record['seconds']:.4f} | "
                  f"{record['ratio']:.2f}x |")  # fmt: skip
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"quality": rows, "summary": summary, "speed": records}, indent=2))
    return summary, records


if __name__ == "__main__":
    main(parse_args())
