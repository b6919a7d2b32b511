"""Where a decoding step of `generate()` goes on CPU: matmuls on the weights, attention, everything else.

    python benchmarks/step_profile.py --preset rar-b --batch_size 4 --dtype bfloat16

Profiles (torch.profiler) one call of `--num_tokens` steps after a warm-up call, groups the CPU self time of every
operator into weights (the products with the weights: oneDNN packed, F.linear/addmm), attention (scaled dot product
and its pieces) and the rest (norms, modulation, residuals, cache writes, sampling, the generation loop's ops), and
prints ms per step next to the floor of one read of the weights at `--bandwidth` GB/s.
"""

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from generate import DTYPES, PRESETS, build_model

WEIGHT_OPS = ("_linear_pointwise", "packed_linear", "addmm", "aten::mm", "aten::linear")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::bmm", "aten::baddbmm", "softmax")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rar-b", choices=PRESETS)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--num_tokens", type=int, default=64)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--bandwidth", type=float, default=47.0, help="GB/s of the machine's memory (the floor).")
    p.add_argument("--no_fast_paths", action="store_true", help="Profile the plain model (nn.Linear, sdpa).")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=12, help="Print the N operators with the most self time.")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.preset, DTYPES[args.dtype], "cpu").eval()
    if not args.no_fast_paths:
        from rar_hf import enable_cpu_fast_paths

        enable_cpu_fast_paths(model, num_rows=2 * args.batch_size)
    kwargs = dict(class_labels=[i % model.config.num_classes for i in range(args.batch_size)], do_sample=True,
                  guidance_scale=args.guidance_scale, max_new_tokens=args.num_tokens, min_new_tokens=args.num_tokens,
                  disable_compile=True)
    model.generate(**kwargs)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(**kwargs)
    events = prof.key_averages()
    groups, total = collections.Counter(), 0.0
    for event in events:
        if event.key.startswith("ProfilerStep"):
            continue
        total += event.self_cpu_time_total
        name = event.key
        group = "weights" if any(k in name for k in WEIGHT_OPS) else "attention" if any(k in name for k in ATTENTION_OPS) else "rest"
        groups[group] += event.self_cpu_time_total
    steps = args.num_tokens
    # Weights streamed per step: every linear except the AdaLN projections (precomputed per chunk of positions).
    step_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and "adaln" not in n)
    floor = step_bytes / (args.bandwidth * 1e9) * 1e3
    rows = args.batch_size * (2 if args.guidance_scale != 1 else 1)
    print(f"{args.preset} {args.dtype} batch {args.batch_size} ({rows} rows), {steps} steps, {torch.get_num_threads()} threads")
    for group in ("weights", "attention", "rest"):
        print(f"  {group:10s} {groups[group] / 1e3 / steps:7.2f} ms/step")
    print(f"  {'total':10s} {total / 1e3 / steps:7.2f} ms/step (profiled, operator self time)")
    print(f"  floor: {step_bytes / 2**20:.0f} MiB of weights per step at {args.bandwidth:.0f} GB/s = {floor:.2f} ms/step")
    if args.top > 0:
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
