"""Sampling speed of RARForImageGeneration.generate (random weights): image tokens/s, images/s and peak memory.

    python benchmarks/generate.py --preset rar-b --batch_size 4 --num_tokens 32            # quick CPU figure
    python benchmarks/generate.py --preset rar-xl --batch_size 128 --dtype bfloat16 --cache static --compile
    python benchmarks/generate.py --preset tiny --num_tokens 4 --baseline --check            # smoke test (seconds)

One configuration per run: a fixed-format line (or a JSON record with --json) per timed sampler. `--baseline` also
times the official sampler's cost structure (benchmarks/official_sampler.py) at the same weights, batch and dtype and
prints the speed-up; `--impl official` times only that baseline (run_all.py uses it to get its own peak memory).

Counting. tokens/s = batch x generated image tokens / seconds (a guided image counts once although CFG runs two
rows). With `--num_tokens N < L`, images/s is extrapolated linearly to the L tokens of an image; later steps attend
over a longer prefix, so the extrapolation slightly flatters images/s. `--decode` adds the VQ decoding of L tokens per
image to pixels (random-weight MaskGIT-VQGAN of the official size), as Table 5 of the paper counts it. Peak memory:
torch.cuda.max_memory_allocated on CUDA; on CPU the peak RSS of the whole process (getrusage), which includes the
Python runtime and never decreases, so compare it only between separate processes.

Compilation. `--compile --cache static` uses generate's own compilation path (transformers compiles the decoding
forward when the cache is static; `CompileConfig`, mode reduce-overhead = CUDA graphs on GPU); with `--cache dynamic`
or `none` the model's forward is wrapped in torch.compile (dynamic shapes). Without `--compile`, generate's automatic
compilation is switched off (`disable_compile=True`), so "eager" really is eager on GPU too.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_sampler, when imported from elsewhere

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PRESETS = ("tiny", "rar-b", "rar-l", "rar-xl", "rar-xxl")
# A model small enough for smoke tests, and a MaskGIT-VQGAN of matching codebook/grid for --decode.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, codebook_size=64,
            num_classes=10, image_seq_len=16)
TINY_VQ = dict(hidden_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=8, codebook_size=64,
               sample_size=8)


# ------------------------------------------------------------------------------------------------------ shared helpers
def ensure_rar_hf() -> None:
    """Make `rar_hf.modeling_rar`, `rar_hf.configuration_rar` and `rar_hf.data.collator` importable even where the
    package's `__init__` cannot run, e.g. on a GPU image without diffusers (the package root imports the pipeline) or
    without PIL (`rar_hf.data` imports the image transforms): the failing package is replaced by a bare namespace over
    the same folder, so that only the submodules the benchmarks use are imported."""
    import types

    for name in ("rar_hf", "rar_hf.data"):
        try:
            importlib.import_module(name)
        except ImportError as error:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise
            package = types.ModuleType(name)
            package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules[name] = package
            print(f"note: `import {name}` failed ({error}); using its submodules directly", file=sys.stderr)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rar_config(preset: str, **overrides):
    ensure_rar_hf()
    from rar_hf.configuration_rar import RARConfig

    if preset == "tiny":
        return RARConfig(**{**TINY, **overrides})
    return RARConfig.from_preset(preset, **overrides)


def build_model(preset: str, dtype: torch.dtype, device, seed: int = 0, **config_overrides):
    """A random-weight RARForImageGeneration created directly in `dtype` on `device`, adaLN weights made non-zero."""
    ensure_rar_hf()
    from rar_hf.modeling_rar import RARForImageGeneration

    torch.manual_seed(seed)
    config = rar_config(preset, **config_overrides)
    with torch.device(device):
        model = RARForImageGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        # adaLN-zero makes every block the identity at init; small random values give a realistic computation.
        for name, param in model.named_parameters():
            if "adaln_modulation" in name and name.endswith("weight"):
                param.normal_(0.0, config.initializer_range)
    return model


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process peak RSS"


def time_runs(fn, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def environment(device) -> dict:
    import transformers

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        name += f", {os.cpu_count()} cores"
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def format_bytes(num: int) -> str:
    return f"{num / 2**30:.2f} GiB" if num >= 2**30 else f"{num / 2**20:.0f} MiB"


def emit(record: dict, as_json: bool) -> None:
    print(json.dumps(record) if as_json else format_line(record), flush=True)


def format_line(r: dict) -> str:
    if r["bench"] == "train_step":
        head = (f"train_step preset={r['preset']} batch={r['batch_size']} precision={r['precision']} "
                f"grad_ckpt={'yes' if r['gradient_checkpointing'] else 'no'}")
        speed = f"tokens/s={r['tokens_per_s']:.1f} images/s={r['images_per_s']:.3f} s/step={r['seconds']:.3f}"
    else:
        head = (f"generate impl={r['impl']} preset={r['preset']} batch={r['batch_size']} dtype={r['dtype']} "
                f"cache={r['cache']} compile={r['compile']} guidance={r['guidance_scale']} "
                f"tokens={r['num_tokens']}/{r['image_seq_len']} decode={'yes' if r['decode'] else 'no'}")
        note = f" (extrapolated from {r['num_tokens']} of {r['image_seq_len']} tokens)" if r["extrapolated"] else ""
        speed = f"tokens/s={r['tokens_per_s']:.1f} images/s={r['images_per_s']:.3f}{note} s/run={r['seconds']:.3f}"
        if r.get("speedup_vs_official"):
            speed += f" speedup_vs_official={r['speedup_vs_official']:.2f}x"
    mem = f"peak_mem={format_bytes(r['peak_mem_bytes'])} ({r['peak_mem_kind']})"
    return f"{head} | {speed} | {mem} | device={r['device']} threads={r['threads']}"


# ---------------------------------------------------------------------------------------------------------- benchmark
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rar-b", choices=PRESETS, help="Model size (random weights).")
    p.add_argument("--batch_size", type=int, default=4, help="Images per generate call (CFG runs twice as many rows).")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Weights and compute dtype.")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static", "none"], help="KV cache of generate.")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding forward (see above).")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode (default: reduce-overhead on CUDA with a static cache, else default).")
    p.add_argument("--fullgraph", action="store_true", help="Compile with fullgraph=True (fails on graph breaks).")
    p.add_argument("--no_fast_paths", action="store_true",
                   help="The plain model (nn.Linear, sdpa) instead of rar_hf.enable_cpu_fast_paths (oneDNN-packed "
                        "linears and the CPU decoding attention, applied once before the runs) on CPU.")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="CFG scale; != 1 doubles the batch.")
    p.add_argument("--guidance_scale_pow", type=float, default=0.0, help="pow-cosine exponent (no effect on speed).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--num_tokens", type=int, default=None, help="Image tokens per run (default: all L).")
    p.add_argument("--repeats", type=int, default=3, help="Timed runs; the median is reported.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed runs first (compilation happens here).")
    p.add_argument("--impl", default="hf", choices=["hf", "official"],
                   help="hf: model.generate; official: the official sampler's cost structure only.")
    p.add_argument("--baseline", action="store_true", help="Also time the official sampler and print the speed-up.")
    p.add_argument("--baseline_warmup", type=int, default=None,
                   help="Untimed runs of the official sampler before timing it (default: --warmup; it compiles nothing).")
    p.add_argument("--check", action="store_true",
                   help="Before timing, check the official sampler against generate on these weights (teacher-forced "
                        "logits, greedy tokens) for min(num_tokens, 8) steps.")
    p.add_argument("--decode", action="store_true", help="Add VQ decoding to pixels (needs diffusers).")
    p.add_argument("--tf32", action="store_true", help="CUDA float32 matmuls in TF32 (PyTorch's default is off).")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights and samples.")
    p.add_argument("--json", action="store_true", help="Print JSON records instead of text lines.")
    args = p.parse_args(argv)
    args.dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    if args.impl == "official" and (args.compile or args.cache != "dynamic"):
        p.error("--impl official is the official eager sampler (KV cache grown by torch.cat): no --compile/--cache")
    return args


def run_check(model, args, num_tokens) -> bool:
    from official_sampler import check_parity

    steps = min(num_tokens, 8)
    kwargs = {"cache_implementation": "static"} if args.cache == "static" else {}
    if args.cache == "none":
        kwargs = {"use_cache": False}
    diff, scale, agree = check_parity(model, args.guidance_scale, args.guidance_scale_pow, num_tokens=steps, **kwargs)
    # float32 must match to rounding; bfloat16 paths round differently (mask/cache layout), so only roughly.
    tolerance = (1e-4 if args.dtype == "float32" else 5e-2) * max(1.0, scale)
    ok = diff <= tolerance and (agree == 1.0 or args.dtype != "float32")
    print(f"check {'ok' if ok else 'FAILED'}: official sampler vs generate(do_sample=False), {steps} steps, "
          f"{args.dtype}, cache={args.cache}: max |guided logit diff| {diff:.2e} (tolerance {tolerance:.1e}), "
          f"greedy token agreement {agree:.3f}", file=sys.stderr if args.json else sys.stdout, flush=True)
    return ok


def decode_seconds(model, args, device, dtype) -> float:
    try:
        from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel  # imports diffusers: only with --decode
    except ImportError as error:
        raise SystemExit(f"--decode needs diffusers (the MaskGIT-VQGAN is a diffusers model): {error}") from None
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(bfloat16) logs an empty "keep in float32" notice
    config = model.config
    torch.manual_seed(args.seed)
    vqvae = MaskGITVQModel(**(TINY_VQ if args.preset == "tiny" else {})).to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, config.codebook_size, (args.batch_size, config.image_seq_len), device=device)
    latent_size = tuple(config.latent_size)

    @torch.no_grad()
    def decode():
        vqvae.decode(tokens, latent_size=latent_size)

    return statistics.median(time_runs(decode, device, args.repeats, args.warmup))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(args.preset, dtype, device, seed=args.seed).eval()
    from rar_hf import disable_cpu_fast_paths, enable_cpu_fast_paths

    config = model.config
    length = config.image_seq_len
    num_tokens = min(args.num_tokens or length, length)
    if args.check and not run_check(model, args, num_tokens):
        raise SystemExit(1)
    labels = [i % config.num_classes for i in range(args.batch_size)]
    input_ids = model.prepare_class_ids(labels, device=device)
    sampling = dict(guidance_scale=args.guidance_scale, guidance_scale_pow=args.guidance_scale_pow)

    def hf_runner():
        kwargs = dict(do_sample=True, temperature=args.temperature, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                      use_cache=args.cache != "none", cache_implementation="static" if args.cache == "static" else None,
                      disable_compile=True)
        if args.compile:
            mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" and args.cache == "static" else "default")
            if args.cache == "static":
                # generate compiles the decoding steps itself when the cache is static; on CPU only when asked to.
                compile_config = transformers.CompileConfig(fullgraph=args.fullgraph, mode=mode)
                compile_config._compile_all_devices = device.type != "cuda" or None
                kwargs.update(disable_compile=False, compile_config=compile_config)
            else:
                model.forward = torch.compile(model.forward, mode=mode, fullgraph=args.fullgraph)
            args.compile_mode = mode
        return lambda: model.generate(input_ids=input_ids, **sampling, **kwargs)

    def official_runner():
        from official_sampler import OfficialSampler

        sampler = OfficialSampler(model)
        return lambda: sampler.generate(labels, args.guidance_scale, args.guidance_scale_pow, args.temperature,
                                        num_tokens=num_tokens)

    def measure(impl, make_runner):
        fast_paths = impl == "hf" and not args.no_fast_paths and device.type == "cpu"
        if fast_paths:  # what RARPipeline and the CLI run on a CPU (the official baseline: plain F.linear and sdpa)
            enable_cpu_fast_paths(model, num_rows=2 * args.batch_size)
        else:
            disable_cpu_fast_paths(model)
        reset_peak_memory(device)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            warmup = args.warmup if impl == "hf" or args.baseline_warmup is None else args.baseline_warmup
            times = time_runs(make_runner(), device, args.repeats, warmup)
        seconds = statistics.median(times)
        mem, mem_kind = peak_memory(device)
        return {
            "bench": "generate", "impl": impl, "preset": args.preset, "batch_size": args.batch_size,
            "dtype": args.dtype, "cache": args.cache if impl == "hf" else "official",
            "compile": "compile" if args.compile and impl == "hf" else "eager",
            "compile_mode": args.compile_mode if impl == "hf" else None, "guidance_scale": args.guidance_scale,
            "fast_paths": fast_paths,
            "num_tokens": num_tokens, "image_seq_len": length, "extrapolated": num_tokens < length,
            "decode": args.decode, "tf32": args.tf32, "seconds": seconds, "all_seconds": times,
            "tokens_per_s": args.batch_size * num_tokens / seconds,
            "images_per_s": args.batch_size / (seconds * length / num_tokens),
            "peak_mem_bytes": mem, "peak_mem_kind": mem_kind, **environment(device),
        }

    runners = {"hf": hf_runner, "official": official_runner}
    records = [measure(args.impl, runners[args.impl])]
    if args.baseline and args.impl == "hf":
        records.append(measure("official", official_runner))
        records[0]["speedup_vs_official"] = records[1]["seconds"] / records[0]["seconds"]
    if args.decode:
        decode = decode_seconds(model, args, device, dtype)
        for record in records:
            record["decode_seconds"] = decode
            record["images_per_s"] = args.batch_size / (record["seconds"] * length / num_tokens + decode)
    for record in records:
        emit(record, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
