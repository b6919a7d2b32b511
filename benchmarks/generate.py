"""Sampling speed of RARForImageGeneration.generate (random weights): image tokens/s, images/s and peak memory.

    python benchmarks/generate.py --preset rar-b --batch_size 4 --num_tokens 32            # quick CPU figure
    python benchmarks/generate.py --preset rar-xl --batch_size 128 256 --dtype bfloat16 --profile 16
    python benchmarks/generate.py --preset rar-xl --batch_size 128 --dtype bfloat16 --cache static --compile
    python benchmarks/generate.py --preset rar-xl --batch_size 16 128 --dtype bfloat16 --pipeline
    python benchmarks/generate.py --preset tiny --num_tokens 4 --baseline --check            # smoke test (seconds)

One configuration per run, on one set of weights, for each `--batch_size` (and each `--jacobi_window`): a
fixed-format line (or a JSON record with --json) per timed sampler, printed as soon as it is measured. `--baseline`
also times the official sampler's cost structure (benchmarks/official_sampler.py) at the same weights, batch and dtype
and prints the speed-up (`--baseline_warmup` / `--baseline_repeats` give it its own time); `--impl official` times
only that baseline (run_all.py uses it to get its own peak memory).

Counting. tokens/s = batch x generated image tokens / seconds (a guided image counts once although CFG runs two
rows). With `--num_tokens N < L`, images/s is extrapolated linearly to the L tokens of an image; later steps attend
over a longer prefix, so the extrapolation slightly flatters images/s. `--decode` adds the VQ decoding of L tokens per
image to pixels (random-weight MaskGIT-VQGAN of the official size, in float32, its declared precision), as Table 5 of
the paper counts it; `--pipeline` times `RARPipeline.__call__` itself (decoding and conversion to PIL included).
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the peak RSS of the whole process (getrusage), which
includes the Python runtime and never decreases, so compare it only between separate processes.

Compilation. `--compile --cache static` uses generate's own compilation path (transformers compiles the decoding
forward when the cache is static; `CompileConfig`, mode reduce-overhead = CUDA graphs on GPU); with `--cache dynamic`
or `none` the model's forward is wrapped in torch.compile (dynamic shapes). Without `--compile`, generate's automatic
compilation is switched off (`disable_compile=True`), so "eager" really is eager on GPU too. `--warmup_tokens` keeps
the warm-up short; a static cache is then still sized for the timed runs, so the step is compiled once. Compiled
records carry dynamo's graph count and graph breaks and inductor's CUDA-graph skips.

Profile. `--profile STEPS` profiles STEPS decoding steps from the middle of the image (torch.profiler) and splits a
step by part: step inputs, logits processors, stopping criteria, the forward (and, eager, its layers' attention
projections, attention kernel, cache update, MLP, norms and modulation), the loop; on a GPU also by kind of kernel,
with the kernels launched, the host synchronisations and the device's idle time per step.
"""

import argparse
import collections
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
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
    if r["bench"] == "profile":
        if r.get("error"):
            return f"profile preset={r['preset']} batch={r['batch_size']} FAILED: {r['error']}"
        parts = ", ".join(f"{k} {v:.3f}" for k, v in (r["device_ms"] or r["host_ms"]).items())
        busy = "" if r["device_busy_ms_per_step"] is None else f" device busy {r['device_busy_ms_per_step']:.3f} ms"
        return (f"profile preset={r['preset']} batch={r['batch_size']} dtype={r['dtype']} cache={r['cache']} "
                f"compile={r['compile']} label={r['label'] or '-'} | {r['wall_ms_per_step']:.3f} ms/step{busy}, "
                f"{r['syncs_per_step']} syncs/step | {'device' if r['device_ms'] else 'host'} ms/step: {parts}")
    if r["bench"] == "pipeline":
        split = ", ".join(f"{k} {v:.3f} s" for k, v in r["split_seconds"].items())
        return (f"pipeline preset={r['preset']} batch={r['batch_size']} dtype={r['dtype']} vq={r['vq_dtype']} | "
                f"images/s={r['images_per_s']:.3f} s/batch={r['seconds']:.3f} ({split}); generate() alone "
                f"{r['generate_seconds']:.3f} s, bfloat16 decode {r['decode_bfloat16_seconds']:.3f} s | "
                f"peak_mem={format_bytes(r['peak_mem_bytes'])} ({r['peak_mem_kind']}) | device={r['device']}")
    if r["bench"] == "train_step":
        head = (f"train_step preset={r['preset']} batch={r['batch_size']} precision={r['precision']} "
                f"grad_ckpt={'yes' if r['gradient_checkpointing'] else 'no'}")
        speed = f"tokens/s={r['tokens_per_s']:.1f} images/s={r['images_per_s']:.3f} s/step={r['seconds']:.3f}"
    else:
        head = (f"generate impl={r['impl']} preset={r['preset']} batch={r['batch_size']} dtype={r['dtype']} "
                f"cache={r['cache']} compile={r['compile']} guidance={r['guidance_scale']} "
                f"tokens={r['num_tokens']}/{r['image_seq_len']} decode={'yes' if r['decode'] else 'no'}")
        if r.get("jacobi_window"):
            head += f" jacobi_window={r['jacobi_window']}"
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
    p.add_argument("--batch_size", type=int, nargs="+", default=[4],
                   help="Images per generate call (CFG runs twice as many rows); several values run one after the "
                        "other on the same weights, one record each.")
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
    p.add_argument("--warmup_tokens", type=int, default=None,
                   help="Tokens of each untimed run (default: as the timed runs). With a static cache the warm-up "
                        "cache is sized for the timed runs, so a compiled step is compiled (and CUDA-graphed) once.")
    p.add_argument("--jacobi_window", type=int, nargs="+", default=[0],
                   help="Speculative Jacobi decoding with this window (0: plain decoding); several values give one "
                        "record each.")
    p.add_argument("--impl", default="hf", choices=["hf", "official"],
                   help="hf: model.generate; official: the official sampler's cost structure only.")
    p.add_argument("--baseline", action="store_true", help="Also time the official sampler and print the speed-up.")
    p.add_argument("--baseline_warmup", type=int, default=None,
                   help="Untimed runs of the official sampler before timing it (default: --warmup; it compiles nothing).")
    p.add_argument("--baseline_repeats", type=int, default=None,
                   help="Timed runs of the official sampler (default: --repeats): its own time budget.")
    p.add_argument("--check", action="store_true",
                   help="Before timing, check the official sampler against generate on these weights (teacher-forced "
                        "logits, greedy tokens) for min(num_tokens, 8) steps.")
    p.add_argument("--decode", action="store_true",
                   help="Add VQ decoding to pixels in float32, the tokenizer's declared precision (needs diffusers).")
    p.add_argument("--pipeline", action="store_true",
                   help="Time RARPipeline.__call__ (output_type='pil', decoding included) instead of generate: the "
                        "generator in --dtype, the official-size MaskGIT-VQGAN in float32 (what "
                        "RARPipeline.from_pretrained(..., dtype=torch.bfloat16) gives), with the time split into "
                        "sampling, decoding and conversion, against plain generate() and a bfloat16 decode in the same "
                        "process (needs diffusers).")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="After timing, profile STEPS decoding steps (torch.profiler) from the middle of the image "
                        "(the first half of its tokens prefilled) and emit a per-step profile record.")
    p.add_argument("--label", default="", help="A label for the records (e.g. 'before' for an older rar_hf).")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA float32 matmuls of generate in TF32 (PyTorch's default is off); the official sampler "
                        "always runs with PyTorch's defaults, as its code does.")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights and samples.")
    p.add_argument("--json", action="store_true", help="Print JSON records instead of text lines.")
    args = p.parse_args(argv)
    args.dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
    if args.impl == "official" and (args.compile or args.cache != "dynamic"):
        p.error("--impl official is the official eager sampler (KV cache grown by torch.cat): no --compile/--cache")
    if any(b < 1 for b in args.batch_size) or any(w < 0 for w in args.jacobi_window):
        p.error("--batch_size must be >= 1 and --jacobi_window >= 0")
    if args.pipeline and (args.impl != "hf" or args.baseline or args.decode or args.compile or args.cache == "none"
                          or args.jacobi_window != [0] or args.num_tokens):
        p.error("--pipeline times the pipeline's own call (all tokens, its default cache, eager): drop --impl/--baseline/"
                "--decode/--compile/--cache none/--jacobi_window/--num_tokens")
    if args.compile and args.jacobi_window != [0]:
        p.error("--jacobi_window runs the speculative loop, which is not compiled: drop --compile")
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


def build_vqvae(preset: str, device, dtype=torch.float32):
    """A random-weight MaskGIT-VQGAN of the official size (tiny for the tiny preset), in `dtype` (float32: its
    declared precision, see MaskGITVQModel)."""
    try:
        from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel  # imports diffusers
    except ImportError as error:
        raise SystemExit(f"--decode / --pipeline need diffusers (the MaskGIT-VQGAN is a diffusers model): {error}") from None
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(bfloat16) names the float32 modules it casts anyway
    with torch.device(device):
        return MaskGITVQModel(**(TINY_VQ if preset == "tiny" else {})).to(dtype=dtype).eval()


def decode_seconds(model, args, batch_size, device, vqvae=None) -> float:
    config = model.config
    torch.manual_seed(args.seed)
    vqvae = vqvae if vqvae is not None else build_vqvae(args.preset, device)
    tokens = torch.randint(0, config.codebook_size, (batch_size, config.image_seq_len), device=device)
    latent_size = tuple(config.latent_size)

    @torch.no_grad()
    def decode():
        vqvae.decode(tokens, latent_size=latent_size)

    return statistics.median(time_runs(decode, device, args.repeats, args.warmup))


def compile_counters() -> dict:
    """Dynamo's compiled graphs (more than one for a decoding step means recompilations) and graph breaks, and
    inductor's CUDA-graph skips, so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


# ---------------------------------------------------------------------------------------------- per-step profile
_RANGES = {  # module class name -> range (eager runs only: hooks inside a compiled graph would recompile it)
    "RARForImageGeneration": "forward: embeddings, mask, output norm",
    "RARDecoderLayer": "layer: norms, modulation, residuals",
    "RARAttention": "attention: qkv/o projections, q/k norms",
    "RARMLP": "mlp",
}
LOOP = "loop: logits copy, sampling, append, stop check"


@contextmanager
def step_ranges(model, modules: bool):
    """Name what a decoding step spends time on, as torch.profiler ranges ("rar::<part>"): the model's modules, the
    attention kernel and the cache update (when `modules`, i.e. eager), and, always, generate's parts outside the
    forward (step inputs, logits processors, stopping criteria) and the forward call itself."""
    from torch.profiler import record_function
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.cache_utils import DynamicLayer, StaticLayer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def ranged(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with record_function(f"rar::{name}"):
                return fn(*args, **kwargs)

        return wrapper

    undo = []

    def patch(owner, attribute, name):
        original = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute)
        had = attribute in vars(owner)
        setattr(owner, attribute, ranged(name, getattr(owner, attribute)))
        undo.append(lambda: setattr(owner, attribute, original) if had else delattr(owner, attribute))

    patch(model, "prepare_inputs_for_generation", "step inputs + modulations")
    patch(LogitsProcessorList, "__call__", "logits processors")
    patch(StoppingCriteriaList, "__call__", "stopping criteria")
    compiled = getattr(model, "_compiled_call", None)
    if compiled is not None and not modules:  # generate's compiled forward: one range around each call
        model._compiled_call = ranged("forward (compiled)", compiled)
        undo.append(lambda: setattr(model, "_compiled_call", compiled))
    if modules:
        patch(DynamicLayer, "update", "cache update")
        patch(StaticLayer, "update", "cache update")
        implementation = model.config._attn_implementation
        if implementation in ALL_ATTENTION_FUNCTIONS:
            kernel = ALL_ATTENTION_FUNCTIONS[implementation]
            ALL_ATTENTION_FUNCTIONS[implementation] = ranged("attention kernel", kernel)
            undo.append(lambda: ALL_ATTENTION_FUNCTIONS.__setitem__(implementation, kernel))
        handles = []
        for module in model.modules():
            name = _RANGES.get(type(module).__name__)
            if name is None:
                continue
            contexts = []

            def enter(mod, inputs, name=name, contexts=contexts):
                context = record_function(f"rar::{name}")
                context.__enter__()
                contexts.append(context)

            def leave(mod, inputs, output, contexts=contexts):
                contexts.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        undo.append(lambda: [handle.remove() for handle in handles])
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


def _kernel_class(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("fmha", "flash", "attention", "attn", "sdpa")):
        return "attention kernels"
    if any(k in lowered for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm80", "matmul", "dot")):
        return "matmul kernels"
    if any(k in lowered for k in ("memcpy", "memset", "copy", "cat", "index", "gather", "scatter")):
        return "copies, cat, index"
    return "other kernels"


def profile_steps(model, args, batch_size, device, compiled: bool) -> dict:
    """Profile `args.profile` decoding steps from the middle of the image and split their time by part (see
    `step_ranges`): host time per part (operators' own time; what is left of the wall time is Python between
    operators), and on a GPU the device time per part (the kernels each part launched), by kind of kernel, the
    kernels launched, host synchronisations and the time the host waited in them, and the device's idle time
    (launch gaps and waits). Per decoding step, in milliseconds. With a static cache the cache is sized for a whole
    image, as in the timed runs, so a compiled step is the one already compiled."""
    from torch.profiler import ProfilerActivity, profile

    config = model.config
    steps = min(args.profile, config.image_seq_len - 1)
    known = max(0, min(config.image_seq_len - steps - 1, config.image_seq_len // 2 - steps // 2))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    tokens = torch.randint(0, config.codebook_size, (batch_size, known), generator=generator).to(device)
    labels = [i % config.num_classes for i in range(batch_size)]
    input_ids = torch.cat([model.prepare_class_ids(labels, device=device), tokens], dim=1)
    kwargs = generate_kwargs(args, steps + 1, device, full_tokens=config.image_seq_len)  # a whole image's cache
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    model.generate(input_ids=input_ids, **kwargs)  # warm: this prefill length, the profiler's own start-up
    with step_ranges(model, modules=not compiled):
        prepare, calls, started = model.prepare_inputs_for_generation, [], []

        @functools.wraps(prepare)  # (generate reads its signature)
        def start_after_prefill(*args, **kwargs):  # the first call is the prefill of the known tokens
            calls.append(None)
            if len(calls) == 2:
                synchronize(device)
                prof.start()
                started.append(time.perf_counter())
            return prepare(*args, **kwargs)

        model.prepare_inputs_for_generation = start_after_prefill
        try:
            model.generate(input_ids=input_ids, **kwargs)
            synchronize(device)
            prof.stop()
            wall = time.perf_counter() - started[0]
        finally:
            model.prepare_inputs_for_generation = prepare
    return summarize_profile(prof, steps, wall, cuda) | {"profiled_from_token": known}


def summarize_profile(prof, steps: int, wall: float, cuda: bool) -> dict:
    host_ms, device_ms, kernel_classes, top = (collections.Counter() for _ in range(4))
    syncs = sync_wait = scalar_reads = kernel_count = 0
    intervals = []
    for event in prof.events():
        if "CUDA" in str(getattr(event, "device_type", "")):  # a kernel, copy or memset on the device
            kernel_count += 1
            intervals.append((event.time_range.start, event.time_range.end))
            duration = event.time_range.elapsed_us() / 1e3
            kernel_classes[_kernel_class(event.name)] += duration
            top[event.name[:90]] += duration
            continue
        if event.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
            sync_wait += event.cpu_time_total / 1e3
        scalar_reads += event.name == "aten::_local_scalar_dense"
        part, parent = LOOP, event
        while parent is not None:  # the innermost named range around this op (or the range itself)
            if parent.name.startswith("rar::"):
                part = parent.name[len("rar::"):]
                break
            parent = parent.cpu_parent
        host_ms[part] += event.self_cpu_time_total / 1e3
        for kernel in getattr(event, "kernels", None) or []:  # the device work this op launched
            device_ms[part] += kernel.duration / 1e3
    wall_ms = wall * 1e3
    host_ms["host outside any op (Python)"] = max(0.0, wall_ms - sum(host_ms.values()))
    busy = _device_busy_ms(intervals) if cuda else None

    def per_step(counter):
        return {k: round(v / steps, 4) for k, v in sorted(counter.items(), key=lambda kv: -kv[1])}

    return {
        "bench": "profile", "steps": steps, "wall_ms_per_step": round(wall_ms / steps, 4),
        "device_busy_ms_per_step": None if busy is None else round(busy / steps, 4),
        "device_idle_ms_per_step": None if busy is None else round((wall_ms - busy) / steps, 4),
        "kernels_per_step": round(kernel_count / steps, 2) if cuda else None,
        "syncs_per_step": round(syncs / steps, 3), "sync_wait_ms_per_step": round(sync_wait / steps, 4),
        "scalar_reads_per_step": round(scalar_reads / steps, 3),
        "host_ms": per_step(host_ms), "device_ms": per_step(device_ms) if cuda else None,
        "kernel_classes": per_step(kernel_classes) if cuda else None,
        "top_kernels": list(per_step(top).items())[:8] if cuda else None,
    }


def _device_busy_ms(intervals) -> float:
    """Milliseconds in which at least one of the device events `(start_us, end_us)` ran: the union of intervals."""
    busy, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e3


# ---------------------------------------------------------------------------------------------------------- runs
def generate_kwargs(args, num_tokens, device, full_tokens=None):
    """generate() settings of a run of `num_tokens` tokens; a static cache is sized for `full_tokens` (default: the
    same), so that warm-up, profile and timed runs share one compiled step."""
    import transformers

    kwargs = dict(do_sample=True, temperature=args.temperature, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                  use_cache=args.cache != "none", cache_implementation="static" if args.cache == "static" else None,
                  disable_compile=True, guidance_scale=args.guidance_scale, guidance_scale_pow=args.guidance_scale_pow)
    if args.cache == "static" and full_tokens is not None:
        kwargs["max_cache_len"] = full_tokens + 2  # what generate sizes for a run of full_tokens: cls, class, tokens
    if args.compile and args.cache == "static":
        # generate compiles the decoding steps itself when the cache is static; on CPU only when asked to.
        compile_config = transformers.CompileConfig(fullgraph=args.fullgraph, mode=args.compile_mode)
        compile_config._compile_all_devices = torch.device(device).type != "cuda" or None
        kwargs.update(disable_compile=False, compile_config=compile_config)
    return kwargs


def measure_generate(model, args, batch_size, device, dtype) -> list[dict]:
    from rar_hf import disable_cpu_fast_paths, enable_cpu_fast_paths

    config = model.config
    length = config.image_seq_len
    num_tokens = min(args.num_tokens or length, length)
    labels = [i % config.num_classes for i in range(batch_size)]
    input_ids = model.prepare_class_ids(labels, device=device)
    warmup_tokens = min(args.warmup_tokens or num_tokens, num_tokens)
    cuda = torch.device(device).type == "cuda"

    def hf_runner(tokens, jacobi_window=0):
        kwargs = generate_kwargs(args, tokens, device, full_tokens=num_tokens)
        if jacobi_window:
            kwargs["jacobi_window"] = jacobi_window
        return lambda: model.generate(input_ids=input_ids, **kwargs)

    def official_runner(tokens):
        from official_sampler import OfficialSampler

        sampler = OfficialSampler(model)
        return lambda: sampler.generate(labels, args.guidance_scale, args.guidance_scale_pow, args.temperature,
                                        num_tokens=tokens)

    def measure(impl, make_runner, jacobi_window=0):
        fast_paths = impl == "hf" and not args.no_fast_paths and torch.device(device).type == "cpu"
        if fast_paths:  # what RARPipeline and the CLI run on a CPU (the official baseline: plain F.linear and sdpa)
            enable_cpu_fast_paths(model, num_rows=2 * batch_size)
        else:
            disable_cpu_fast_paths(model)
        tf32 = args.tf32 and impl == "hf"  # the official sampler runs with PyTorch's defaults (no TF32)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        reset_peak_memory(device)
        torch.manual_seed(args.seed)
        before = compile_counters()
        with torch.no_grad():
            warmup = args.warmup if impl == "hf" or args.baseline_warmup is None else args.baseline_warmup
            repeats = args.repeats if impl == "hf" or args.baseline_repeats is None else args.baseline_repeats
            extra = {"jacobi_window": jacobi_window} if jacobi_window else {}
            warm = make_runner(warmup_tokens, **extra)
            start = time.perf_counter()
            for _ in range(warmup):
                warm()
            synchronize(device)
            warmup_seconds = time.perf_counter() - start
            times = time_runs(make_runner(num_tokens, **extra), device, repeats, 0)
        seconds = statistics.median(times)
        mem, mem_kind = peak_memory(device)
        after = compile_counters()
        record = {
            "bench": "generate", "impl": impl, "label": args.label, "preset": args.preset, "batch_size": batch_size,
            "dtype": args.dtype, "cache": args.cache if impl == "hf" else "official",
            "compile": "compile" if args.compile and impl == "hf" else "eager",
            "compile_mode": args.compile_mode if impl == "hf" else None, "guidance_scale": args.guidance_scale,
            "guidance_scale_pow": args.guidance_scale_pow, "jacobi_window": jacobi_window, "fast_paths": fast_paths,
            "num_tokens": num_tokens, "image_seq_len": length, "extrapolated": num_tokens < length,
            "decode": args.decode, "tf32": tf32, "seconds": seconds, "min_seconds": min(times), "all_seconds": times,
            "warmup_runs": warmup, "warmup_tokens": warmup_tokens, "warmup_seconds": warmup_seconds,
            "tokens_per_s": batch_size * num_tokens / seconds,
            "images_per_s": batch_size / (seconds * length / num_tokens),
            "peak_mem_bytes": mem, "peak_mem_kind": mem_kind, **environment(device),
        }
        if args.compile and impl == "hf":
            record.update({k: after.get(k, 0) - before.get(k, 0) for k in after})
        return record

    records = []
    if args.impl == "official":
        records.append(measure("official", official_runner))
    else:
        for window in args.jacobi_window:
            records.append(measure("hf", hf_runner, jacobi_window=window))
    if args.baseline and args.impl == "hf":
        records.append(measure("official", official_runner))
        for record in records[:-1]:
            record["speedup_vs_official"] = records[-1]["seconds"] / record["seconds"]
    if args.decode:
        decode = decode_seconds(model, args, batch_size, device)
        for record in records:
            record.update(decode_seconds=decode, decode_dtype="float32")
            record["images_per_s"] = batch_size / (record["seconds"] * length / num_tokens + decode)
    if args.profile and args.impl == "hf" and batch_size == args.batch_size[0]:  # the first batch size only
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        records.append(profile_record(model, args, batch_size, device))
    return records


def profile_record(model, args, batch_size, device) -> dict:
    head = {"label": args.label, "preset": args.preset, "batch_size": batch_size, "dtype": args.dtype,
            "cache": args.cache, "compile": "compile" if args.compile else "eager", "tf32": args.tf32,
            "guidance_scale": args.guidance_scale, **environment(device)}
    try:
        with torch.no_grad():
            return {**head, **profile_steps(model, args, batch_size, device, compiled=args.compile)}
    except Exception as error:  # a profile is a diagnosis: its failure must not cost the timings already measured
        return {**head, "bench": "profile", "error": f"{type(error).__name__}: {error}"[:300]}


def measure_pipeline(model, args, batch_size, device) -> list[dict]:
    """RARPipeline.__call__ as a user runs it (output_type 'pil'), its time split by part, against plain generate()
    with the pipeline's own settings and against decoding in bfloat16, in one process on the same weights."""
    from rar_hf import RARPipeline

    config = model.config
    reset_peak_memory(device)
    vqvae = build_vqvae(args.preset, device)  # float32, as from_pretrained(..., dtype=torch.bfloat16) keeps it
    pipe = RARPipeline(transformer=model, vqvae=vqvae)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % config.num_classes for i in range(batch_size)]
    sampling = dict(guidance_scale=args.guidance_scale, guidance_scale_pow=args.guidance_scale_pow,
                    temperature=args.temperature)
    parts = collections.Counter()

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            synchronize(device)
            start = time.perf_counter()
            out = fn(*a, **k)
            synchronize(device)
            parts[name] += time.perf_counter() - start
            return out

        return wrapper

    pipe.transformer.generate = timed("sampling (generate)", model.generate)
    pipe.vqvae.decode = timed("decoding (float32 VQ)", vqvae.decode)
    pipe._to_output_type = timed("conversion to PIL", pipe._to_output_type)
    try:
        with torch.no_grad():
            run = lambda: pipe(labels, output_type="pil", **sampling)  # noqa: E731
            for _ in range(args.warmup):
                run()
            parts.clear()  # the timed runs' split only
            times = time_runs(run, device, args.repeats, 0)
    finally:
        del pipe.transformer.generate, pipe.vqvae.decode, pipe._to_output_type
    split = {name: seconds / args.repeats for name, seconds in parts.items()}
    # The same sampling through generate() directly (the pipeline's cache: transformers' default for an explicit None).
    with torch.no_grad():
        input_ids = model.prepare_class_ids(labels, device=device)
        plain = time_runs(lambda: model.generate(input_ids=input_ids, cache_implementation=None, do_sample=True,
                                                 disable_compile=True, **sampling),
                          device, args.repeats, 0)
    decode_bf16 = decode_seconds(model, args, batch_size, device, vqvae=build_vqvae(args.preset, device, torch.bfloat16))
    seconds = statistics.median(times)
    mem, mem_kind = peak_memory(device)
    return [{
        "bench": "pipeline", "label": args.label, "preset": args.preset, "batch_size": batch_size,
        "dtype": args.dtype, "vq_dtype": str(next(vqvae.decoder.parameters()).dtype).replace("torch.", ""),
        "output_type": "pil", "guidance_scale": args.guidance_scale, "seconds": seconds, "all_seconds": times,
        "images_per_s": batch_size / seconds, "split_seconds": split,
        "generate_seconds": statistics.median(plain), "decode_bfloat16_seconds": decode_bf16,
        "peak_mem_bytes": mem, "peak_mem_kind": mem_kind, **environment(device),
    }]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.compile and args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if device.type == "cuda" and args.cache == "static" else "default"
    model = build_model(args.preset, dtype, device, seed=args.seed).eval()
    if args.compile and args.cache != "static":
        model.forward = torch.compile(model.forward, mode=args.compile_mode, fullgraph=args.fullgraph)
    num_tokens = min(args.num_tokens or model.config.image_seq_len, model.config.image_seq_len)
    if args.check and not run_check(model, args, num_tokens):
        raise SystemExit(1)
    for batch_size in args.batch_size:
        if args.pipeline:
            records = measure_pipeline(model, args, batch_size, device)
        else:
            records = measure_generate(model, args, batch_size, device, dtype)
        for record in records:  # one line per record as soon as it exists: a run cut short keeps what it measured
            emit(record, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
