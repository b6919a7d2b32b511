"""When do the CPU fast paths (`rar_hf.enable_cpu_fast_paths`: packed linears + the CPU decoding attention) pay off?

Per-step decode time of plain `generate()` (nn.Linear, sdpa) against the fast paths, for model widths from the shipped
digits model to RAR-B (random weights, guidance on, a static cache, 64-token images, the first `--num_tokens` tokens
timed after a short warm-up; the best of `--repeats` alternated runs). `RARPipeline` applies the fast paths per call
from `CPU_FAST_PATHS_MIN_PARAMETERS` parameters on, a threshold read off this table.

    flock /tmp/rar-cpu.lock python benchmarks/cpu_fast_paths.py --threads 2
"""

import argparse
import time

import torch

from rar_hf import RARConfig, RARForImageGeneration, disable_cpu_fast_paths, enable_cpu_fast_paths

SIZES = {
    "digits (h128, 4 layers)": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                    codebook_size=256),
    "h256, 8 layers": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=1024),
    "h512, 12 layers": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
    "RAR-B width (h768, 24 layers)": dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=16,
                                          intermediate_size=3072),
}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    p.add_argument("--num_tokens", type=int, default=32, help="Tokens timed per run.")
    p.add_argument("--repeats", type=int, default=2, help="Runs per mode (alternated); the fastest is reported.")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4], help="Images per call.")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="Model sizes to time.")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, float32, guidance 2.0, static cache, ms per decoding step (best of {args.repeats})")
    print("| model | parameters | batch | plain | fast paths | speed-up |\n|---|---|---|---|---|---|")
    for name in args.sizes:
        torch.manual_seed(0)
        config = RARConfig(**{"codebook_size": 1024, "num_classes": 10, "image_seq_len": 64, "dropout": 0.0,
                              "attention_dropout": 0.0, **SIZES[name]})  # fmt: skip
        model = RARForImageGeneration(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.02)
        for batch_size in args.batch_sizes:
            ids = model.prepare_class_ids(list(range(batch_size)))
            times = {"plain": [], "fast": []}
            for _ in range(args.repeats):
                for mode in times:
                    (enable_cpu_fast_paths if mode == "fast" else disable_cpu_fast_paths)(model)
                    model.generate(ids, guidance_scale=2.0, max_new_tokens=2)  # warm-up
                    start = time.perf_counter()
                    model.generate(ids, guidance_scale=2.0, max_new_tokens=args.num_tokens)
                    times[mode].append((time.perf_counter() - start) / args.num_tokens * 1e3)
            disable_cpu_fast_paths(model)
            plain, fast = min(times["plain"]), min(times["fast"])
            print(f"| {name} | {model.num_parameters() / 1e6:.1f}M | {batch_size} | {plain:.1f} | {fast:.1f} | "
                  f"{plain / fast:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
