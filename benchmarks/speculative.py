"""Speculative decoding on trained models: tokens per forward pass, speed-up and sample quality (tiny digits).

The target is the shipped tiny-digits pipeline (4 layers); the draft model a smaller RAR trained on the same tokens
with the project's scripts (see benchmarks/README.md, "Speculative decoding"). For every method and setting:

- tokens/forward: image tokens kept per forward pass of the target (plain sampling: 1), and the target's (and the
  draft's) forward passes per image;
- speed-up: wall-clock of `generate()` for the same images against plain sampling, at batch 1 (and batch 8 with
  `--batch8` for Jacobi decoding), after a warm-up, median of `--repeats` passes; the methods take turns within
  each pass, so that a drift in the speed of a shared machine hits them all alike;
- quality: digits accuracy and Frechet distance of benchmarks/digits_quality.py on `--num_per_class` x 10 samples,
  next to plain sampling's spread over 3 seeds. The exact methods sample the same distribution at any batch size, so
  quality is sampled at `--quality_batch_size` rows per call to keep the run short.

    python benchmarks/speculative.py --draft outputs/draft/rar-draft-2l outputs/draft/rar-draft-1l  # benchmarks/README.md
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

from rar_hf import RARForImageGeneration, RARPipeline, enable_cpu_fast_paths  # noqa: E402
from rar_hf.data.digits import images_to_digits  # noqa: E402
from rar_hf.speculative_rar import SpeculativeStats  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHIPPED), help="Target pipeline folder (default: the shipped tiny digits).")
    p.add_argument("--draft", nargs="+", default=["outputs/draft/rar-draft-2l"],
                   help="Draft pipeline or transformer folder(s); each is measured with every --num_assistant_tokens.")
    p.add_argument("--num_assistant_tokens", type=int, nargs="*", default=[3, 6], help="Draft lengths to measure (none: no draft rows).")
    p.add_argument("--jacobi_windows", type=int, nargs="*", default=[4, 8, 16], help="Jacobi windows to measure (none: no Jacobi rows).")
    p.add_argument("--relax", type=float, default=None, help="Also measure the relaxed (inexact) rule with this factor.")
    p.add_argument("--speed_images", type=int, default=10, help="Images timed per method at batch 1.")
    p.add_argument("--repeats", type=int, default=3, help="Timed passes per method (median).")
    p.add_argument("--batch8", action="store_true", help="Also time Jacobi decoding at batch 8.")
    p.add_argument("--num_per_class", type=int, default=100, help="Quality samples per class (0: skip quality).")
    p.add_argument("--quality_batch_size", type=int, default=100, help="Rows per generate() call for quality.")
    p.add_argument("--quality_seeds", type=int, default=1,
                   help="Seeds of quality samples per speculative method (plain sampling always gets 3).")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    p.add_argument("--output_json", default=None, help="Also write the records here.")
    p.add_argument("--pass_cost", default=None, metavar="PRESET",
                   help="Only time one forward pass of 1, 5, 9 and 17 new tokens after 128 cached ones on a preset "
                        "(e.g. rar-b, random weights, batch 1): what a verification pass costs against a plain step.")  # fmt: skip
    return p.parse_args(argv)


def load_transformer(path) -> RARForImageGeneration:
    path = Path(path)
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    return RARForImageGeneration.from_pretrained(folder).eval()


def generate(model, labels, seed, stats=None, **method):
    ids = model.prepare_class_ids(labels)
    generator = torch.Generator().manual_seed(seed)
    if method:
        return model.generate(ids, generator=generator, stats=stats, **method)
    # Plain sampling (transformers' own loop) draws from the global RNG.
    torch.manual_seed(seed)
    return model.generate(ids)


def time_methods(model, methods, batch_size, num_images, repeats):
    """Per method: median seconds per image over `repeats` passes, its stats, and the images they count.

    Every pass times each method in turn on the same images (the classes in turn, a seed per image)."""
    calls = max(num_images // batch_size, 1)
    labels = [[(call * batch_size + i) % model.config.num_classes for i in range(batch_size)] for call in range(calls)]
    for method in methods:
        generate(model, labels[0], 0, **method)  # warm-up
    times, stats = [[] for _ in methods], [SpeculativeStats() for _ in methods]
    for repeat in range(repeats):
        for method, method_times, method_stats in zip(methods, times, stats):
            start = time.perf_counter()
            for call in range(calls):
                generate(model, labels[call], 1000 * repeat + call, stats=method_stats if method else None, **method)
            method_times.append((time.perf_counter() - start) / (calls * batch_size))
    images = repeats * calls * batch_size
    return [(statistics.median(t), s, images) for t, s in zip(times, stats)]


def quality(model, vqvae, judge, method, num_per_class, batch_size, seed):
    labels = np.repeat(np.arange(model.config.num_classes), num_per_class)
    images = []
    for start in range(0, len(labels), batch_size):
        tokens = generate(model, labels[start : start + batch_size].tolist(), seed + start, **method)[:, 1:]
        with torch.no_grad():
            images.append(vqvae.decode(tokens, latent_size=tuple(model.config.latent_size)).sample.float())
    return judge.score(images_to_digits(torch.cat(images)), labels)


def pass_cost(preset, repeats=5):
    """Median seconds of one guided-free forward pass of T new tokens over a 128-token prefix in a static cache."""
    from rar_hf import RARConfig, cpu_fast_paths
    from rar_hf.speculative_rar import _GuidedModel

    model = RARForImageGeneration(RARConfig.from_preset(preset)).eval()
    prefix = 128
    sequence = torch.randint(0, model.config.codebook_size, (1, 1 + prefix + 17))
    sequence[:, 0] = model.prepare_class_ids([0])[:, 0]
    rows = {}
    with cpu_fast_paths(model, num_rows=1):
        guided = _GuidedModel(model, 1, None, False, [], "static", model.config.image_seq_len + 1)
        guided.scores(sequence, prefix, prefix - 1)
        for new_tokens in (1, 5, 9, 17):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                guided.scores(sequence, prefix + new_tokens, prefix)
                times.append(time.perf_counter() - start)
                guided.rollback(prefix)
            rows[new_tokens] = statistics.median(times)
    print(f"{preset}, batch 1, float32, CPU fast paths, {torch.get_num_threads()} threads: one forward pass after {prefix} tokens")
    for new_tokens, seconds in rows.items():
        print(f"  {new_tokens:2d} new tokens: {seconds * 1e3:7.1f} ms ({seconds / rows[1]:.2f}x one token)")


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pass_cost:
        return pass_cost(args.pass_cost)
    pipe = RARPipeline.from_pretrained(args.model)
    target, vqvae = pipe.transformer.eval(), pipe.vqvae
    drafts = [load_transformer(path) for path in args.draft] if args.num_assistant_tokens else []
    for model in [target, *drafts]:  # every method on the CPU fast paths, as the pipeline runs them
        enable_cpu_fast_paths(model, num_rows=8)
    methods = [("plain sampling", {})]
    for prefix, rule in [("", {})] + ([(f"RELAXED x{args.relax:g} (inexact): ", dict(acceptance="relaxed", relax=args.relax))] if args.relax else []):  # fmt: skip
        methods += [
            (f"{prefix}draft model ({draft.config.num_hidden_layers}-layer), {k} tokens", dict(assistant_model=draft, num_assistant_tokens=k, **rule))
            for draft in drafts for k in args.num_assistant_tokens
        ]  # fmt: skip
        methods += [(f"{prefix}Jacobi, window {w}", dict(jacobi_window=w, **rule)) for w in args.jacobi_windows]
    judge = DigitsJudge() if args.num_per_class else None
    records = [{"method": name} for name, _ in methods]
    timings = time_methods(target, [method for _, method in methods], 1, args.speed_images, args.repeats)
    for record, (_, method), (seconds, stats, images) in zip(records, methods, timings):
        record["seconds_per_image_b1"] = seconds
        if method:
            record["tokens_per_forward"] = stats.tokens_per_forward
            record["target_forwards_per_image"] = stats.target_forwards / images
            record["draft_forwards_per_image"] = stats.draft_forwards / images
    if args.batch8:
        batched = [i for i, (_, method) in enumerate(methods) if "jacobi_window" in method or not method]
        timings = time_methods(target, [methods[i][1] for i in batched], 8, 16, args.repeats)
        for i, (seconds, stats8, _) in zip(batched, timings):
            records[i]["seconds_per_image_b8"] = seconds
            if methods[i][1]:
                records[i]["tokens_per_forward_b8"] = stats8.tokens_per_forward / 8  # per row: tokens kept per pass
    for record, (_, method) in zip(records, methods):
        if args.num_per_class:
            seeds = [0, 1, 2] if not method else list(range(args.quality_seeds))
            scores = [quality(target, vqvae, judge, method, args.num_per_class, args.quality_batch_size, s) for s in seeds]
            record["accuracy"] = [s["accuracy"] for s in scores]
            record["frechet"] = [s["frechet"] for s in scores]
        print(json.dumps(record), file=sys.stderr, flush=True)
    plain = records[0]
    print(f"target {args.model} ({target.config.num_hidden_layers} layers), drafts {', '.join(args.draft)}; "
          f"{torch.get_num_threads()} threads, batch 1: {args.repeats} x {args.speed_images} images per method")  # fmt: skip
    print("| method | tokens / forward (b1) | target (+ draft) forwards / image | s / image (b1) | speed-up (b1) "
          "| tokens / forward (b8) | speed-up (b8) | accuracy | Frechet |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        forwards = "64" if "tokens_per_forward" not in r else f"{r['target_forwards_per_image']:.1f}"
        if r.get("draft_forwards_per_image"):
            forwards += f" (+ {r['draft_forwards_per_image']:.1f})"
        b8 = "-" if "seconds_per_image_b8" not in r else f"{plain['seconds_per_image_b8'] / r['seconds_per_image_b8']:.2f}x"
        tpf8 = f"{r['tokens_per_forward_b8']:.2f}" if "tokens_per_forward_b8" in r else ("1" if "seconds_per_image_b8" in r else "-")
        acc = " / ".join(f"{a:.1%}" for a in r.get("accuracy", [])) or "-"
        fd = " / ".join(f"{f:.3f}" for f in r.get("frechet", [])) or "-"
        print(f"| {r['method']} | {r.get('tokens_per_forward', 1.0):.2f} | {forwards} | {r['seconds_per_image_b1']:.3f} "
              f"| {plain['seconds_per_image_b1'] / r['seconds_per_image_b1']:.2f}x | {tpf8} | {b8} | {acc} | {fd} |")  # fmt: skip
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    sys.exit(main(parse_args()))
