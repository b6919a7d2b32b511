"""Run a grid of benchmarks (one subprocess per configuration, so peak memory is per configuration) and print one
markdown table.

    python benchmarks/run_all.py                        # CPU grid, RAR-B, ~10 minutes on 2 cores (`make bench`)
    python benchmarks/run_all.py --grid gpu             # GPU grid, RAR-XL (see benchmarks/gpu.sh)
    python benchmarks/run_all.py --grid tiny            # every code path on a tiny model, seconds
    python benchmarks/run_all.py --dry-run              # print the commands only

Grids are lists of (script, arguments, timeout); configurations run in order and a configuration that fails or runs
past its timeout (its whole process group is killed) becomes a row saying so. With `--budget S` configurations stop
being started once S seconds have passed (they are listed as skipped) and each one's timeout is capped to what is
left. The table is rewritten to `--output` after every configuration, so an interrupted run keeps its rows.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GEN, TRAIN = "generate.py", "train_step.py"


def cpu_grid(preset="rar-b", train_preset=None, **_):
    # Short runs: 32 of 256 tokens per image (tokens/s is per decoding step; images/s is extrapolated).
    common = ["--preset", preset, "--batch_size", "4", "--guidance_scale", "2.0", "--num_tokens", "32", "--repeats", "3"]
    train = ["--preset", train_preset or preset, "--batch_size", "8", "--steps", "2"]
    return [
        (GEN, common + ["--dtype", "float32", "--cache", "dynamic"], 300),
        (GEN, common + ["--dtype", "float32", "--cache", "static"], 300),
        (GEN, common + ["--dtype", "float32", "--cache", "static", "--no_fast_paths"], 300),
        (GEN, common + ["--dtype", "float32", "--cache", "dynamic", "--compile"], 900),
        (GEN, common + ["--dtype", "float32", "--cache", "static", "--compile"], 900),
        (GEN, common + ["--dtype", "bfloat16", "--cache", "dynamic"], 300),
        (GEN, common + ["--dtype", "float32", "--impl", "official"], 300),
        (TRAIN, train + ["--precision", "fp32"], 900),
        (TRAIN, train + ["--precision", "bf16"], 900),
    ]


def gpu_grid(preset="rar-xl", train_preset="rar-b", num_tokens=None, batch_sizes=(128, 256), profile_steps=16,
             before_src=None, **_):
    """Issue 23's rows on one GPU, in order of priority so that a time budget cuts the least important ones: RAR-XL
    guided (scale 4.0, pow 1.5, as the issue's table), tokens only unless noted, best-of-2 style (median of 2 after a
    short warm-up). `before_src`: a folder holding an older `rar_hf` package, profiled the same way ("before")."""
    big, bigger = (str(b) for b in batch_sizes)
    guided = ["--preset", preset, "--guidance_scale", "4.0", "--guidance_scale_pow", "1.5"]
    base = guided + ["--warmup_tokens", "8"] + (["--num_tokens", str(num_tokens)] if num_tokens else [])
    bf16, fp32 = ["--dtype", "bfloat16", "--repeats", "2"], ["--dtype", "float32", "--repeats", "2"]
    profile = ["--profile", str(profile_steps)]
    rows = [
        # 1. the default eager path (dynamic cache) at 128 and 256 images, with the per-step profile at 128
        (GEN, base + bf16 + ["--cache", "dynamic", "--batch_size", big, bigger, "--label", "after"] + profile, 150),
        # 2. static cache + generate's own compile (CUDA graphs), with its profile and compile counters
        (GEN, base + bf16 + ["--cache", "static", "--compile", "--batch_size", big, "--label", "after"] + profile, 240),
        # 3. float32: ours with TF32 against the official sampler's cost structure (PyTorch defaults), one process
        (GEN, base + fp32 + ["--tf32", "--cache", "dynamic", "--batch_size", big, "--baseline", "--baseline_repeats",
                             "1"], 150),
        # 4. latency: one image, plain and Jacobi decoding
        (GEN, base + ["--dtype", "bfloat16", "--repeats", "3", "--cache", "dynamic", "--batch_size", "1",
                      "--jacobi_window", "0", "8", "16"], 90),
        # 5. the pipeline with decoding (bfloat16 generator, float32 tokenizer) at 16 and 128 images
        (GEN, guided + bf16 + ["--pipeline", "--batch_size", "16", big], 150),
    ]
    if before_src:  # 6. the same eager row and profile on the older code
        rows.append((GEN, base + ["--dtype", "bfloat16", "--repeats", "1", "--cache", "dynamic", "--batch_size", big,
                                  "--label", "before"] + profile, 120, {"PYTHONPATH": str(before_src)}))
    return rows + [
        # 7. the previous grid's eager row as it was (guidance 2.0, pow 0, full warm-up, median of 3), which gave 25.6
        # images/s in a fresh process where the same path ran at 45.2 in another session's process
        (GEN, ["--preset", preset, "--batch_size", big, "--dtype", "bfloat16", "--guidance_scale", "2.0", "--repeats",
               "3", "--cache", "dynamic", "--label", "previous grid row"], 90),
        (GEN, base + bf16 + ["--cache", "static", "--batch_size", big], 90),  # 8. static cache, eager
        (GEN, base + ["--dtype", "bfloat16", "--repeats", "3", "--cache", "static", "--compile", "--batch_size", "1"],
         240),  # 9. one image, static cache + compile
        (GEN, base + fp32 + ["--cache", "dynamic", "--batch_size", big], 90),  # 10. float32 without TF32
        (TRAIN, ["--preset", train_preset, "--batch_size", "64", "--precision", "bf16", "--steps", "5"], 120),  # 11.
    ]


def tiny_grid(**_):
    common = ["--preset", "tiny", "--batch_size", "2", "--num_tokens", "4", "--repeats", "1", "--threads", "1"]
    return [
        (GEN, common + ["--cache", "dynamic", "--check"], 120),
        (GEN, common + ["--cache", "static"], 120),
        (GEN, common + ["--cache", "none"], 120),
        (GEN, common + ["--impl", "official"], 120),
        (TRAIN, ["--preset", "tiny", "--batch_size", "2", "--steps", "1", "--threads", "1"], 120),
    ]


GRIDS = {"cpu": cpu_grid, "gpu": gpu_grid, "tiny": tiny_grid}
COLUMNS = ["bench", "preset", "batch", "dtype", "cache", "compile", "tokens/s", "images/s", "s/run", "peak mem",
           "notes", "cmd"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="cpu", choices=sorted(GRIDS), help="Which grid to run.")
    p.add_argument("--preset", default=None, help="Sampling model preset (grid default: cpu rar-b, gpu rar-xl).")
    p.add_argument("--train_preset", default=None, help="Training-step preset (grid default: same / rar-b).")
    p.add_argument("--num_tokens", type=int, default=None, help="gpu grid: tokens per image (default: all).")
    p.add_argument("--batch_sizes", type=int, nargs=2, default=None, help="gpu grid: the two sampling batch sizes.")
    p.add_argument("--profile_steps", type=int, default=None, help="gpu grid: decoding steps per profile (16).")
    p.add_argument("--before_src", default=None,
                   help="gpu grid: a folder holding an older rar_hf package (e.g. main before a change): its eager "
                        "row and per-step profile run too, labelled 'before'.")
    p.add_argument("--only", choices=["generate", "train_step"], default=None, help="Run one benchmark only.")
    p.add_argument("--device", default=None, help="Passed to every configuration.")
    p.add_argument("--threads", type=int, default=None, help="Passed to every configuration.")
    p.add_argument("--extra", default="", help="Extra arguments for every configuration, e.g. '--repeats 1'.")
    p.add_argument("--timeout_scale", type=float, default=1.0, help="Multiply every configuration's timeout.")
    p.add_argument("--budget", type=float, default=None, help="Start no configuration after this many seconds.")
    p.add_argument("--output", default=None, help="Also write the markdown table here.")
    p.add_argument("--json_output", default=None, help="Write all JSON records here.")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="Print the commands and exit.")
    p.add_argument("--in_process", action="store_true",
                   help="Run the configurations inside this process (saves the imports of each; no timeouts, and "
                        "peak memory is not per configuration): for wiring checks such as `--grid tiny`.")
    return p.parse_args(argv)


def run_one(command, timeout, env=None):
    """(records, error): the JSON records the command printed (also those printed before a timeout), or why there
    are none. `env`: variables for this command; a PYTHONPATH there goes before the inherited one."""
    start = time.perf_counter()
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        environ[key] = os.pathsep.join(p for p in (value, environ.get(key)) if p) if key == "PYTHONPATH" else value
    # A new session, so that a timeout kills the whole process group (torch.compile's worker processes too).
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=HERE.parent, env=environ)
    error = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()  # what it printed before the kill (records are printed as they are made)
        error = f"timeout after {timeout:.0f} s"
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for line in out.splitlines():
        if not line.startswith("{") and line.strip():
            print(f"    {line}", flush=True)
    if error:
        return records, error + (f" ({len(records)} record(s) kept)" if records else "")
    if proc.returncode != 0 or not records:
        tail = " / ".join(line.strip() for line in err.strip().splitlines()[-3:])
        return records, f"exit {proc.returncode} after {time.perf_counter() - start:.0f} s: {tail[-300:]}"
    return records, None


def run_in_process(script, cmd_args):
    """Run a configuration inside this process (no timeout, shared peak memory): for quick wiring checks only."""
    import contextlib
    import importlib.util
    import io
    import traceback

    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(script).stem}", HERE / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            module.main([*cmd_args, "--json"])
    except BaseException as error:  # argparse and failed checks raise SystemExit
        if isinstance(error, KeyboardInterrupt):
            raise
        records = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
        return records, f"{type(error).__name__}: {error} / {traceback.format_exc().strip().splitlines()[-1][-200:]}"
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")], None


def fmt_mem(record):
    num = record["peak_mem_bytes"]
    text = f"{num / 2**30:.2f} GiB" if num >= 2**30 else f"{num / 2**20:.0f} MiB"
    return text + ("" if record["peak_mem_kind"].startswith("cuda") else " (RSS)")


def row_for(record, records):
    if record["bench"] == "train_step":
        notes = "fwd+bwd+AdamW" + (", grad ckpt" if record["gradient_checkpointing"] else "")
        return ["train_step", record["preset"], record["batch_size"], record["precision"], "-", "eager",
                f"{record['tokens_per_s']:,.0f}", f"{record['images_per_s']:.2f}", f"{record['seconds']:.3f}",
                fmt_mem(record), notes]
    notes = []
    bench = "generate"
    if record["impl"] == "official":
        bench = "official sampler"
    else:
        same = [r for r in records if r.get("impl") == "official" and all(
            r[k] == record[k] for k in ("preset", "batch_size", "dtype", "num_tokens", "guidance_scale", "device"))]
        if same:
            notes.append(f"{same[0]['seconds'] / record['seconds']:.2f}x vs official")
    if record["impl"] == "hf" and record["device"] == "cpu" and record["compile"] == "eager":
        notes.append("CPU fast paths" if record.get("fast_paths") else "plain nn.Linear + sdpa (--no_fast_paths)")
    images = f"{record['images_per_s']:.3g}" + ("*" if record["extrapolated"] else "")
    if record.get("compile_mode") and record["compile"] != "eager":
        notes.append(f"mode={record['compile_mode']}")
    if record.get("decode"):
        notes.append("incl. VQ decode")
    if record.get("tf32"):
        notes.append("TF32")
    if record.get("jacobi_window"):
        notes.append(f"Jacobi window {record['jacobi_window']}")
    if record.get("label"):
        notes.append(record["label"])
    if "graphs" in record:
        notes.append(f"{record['graphs']} graph(s), {record['graph_breaks']} break(s), "
                     f"{record['cudagraph_skips']} CUDA-graph skip(s), warm-up {record['warmup_seconds']:.0f} s")
    if len(record.get("all_seconds", [])) > 1:
        notes.append(f"best {record['min_seconds']:.3f} s")
    cache = "torch.cat" if record["impl"] == "official" else record["cache"]
    return [bench, record["preset"], record["batch_size"], record["dtype"], cache, record["compile"],
            f"{record['tokens_per_s']:,.1f}", images, f"{record['seconds']:.3f}", fmt_mem(record), ", ".join(notes)]


def _parts(parts, limit=6):
    return "; ".join(f"{name} {ms:.2f}" for name, ms in list((parts or {}).items())[:limit]) or "-"


def pipeline_row(r):
    split = r["split_seconds"]

    def part(prefix):
        return next((f"{v:.3f}" for k, v in split.items() if k.startswith(prefix)), "-")

    return [r["preset"], r["batch_size"], r["dtype"], r["vq_dtype"], f"{r['seconds']:.3f}", f"{r['images_per_s']:.2f}",
            part("sampling"), part("decoding"), part("conversion"), f"{r['generate_seconds']:.3f}",
            f"{r['decode_bfloat16_seconds']:.3f}", fmt_mem(r)]


def profile_row(r):
    if r.get("error"):
        return [r.get("label") or "-", r["preset"], r["batch_size"], r["dtype"], r["cache"], r["compile"],
                "failed: " + r["error"].replace("|", "/")] + ["-"] * 6

    def ms(value):
        return "-" if value is None else f"{value:.3f}"

    return [r.get("label") or "-", r["preset"], r["batch_size"], r["dtype"], r["cache"], r["compile"],
            ms(r["wall_ms_per_step"]), ms(r["device_busy_ms_per_step"]), ms(r["device_idle_ms_per_step"]),
            "-" if r["kernels_per_step"] is None else f"{r['kernels_per_step']:.0f}",
            f"{r['syncs_per_step']:g} ({ms(r['sync_wait_ms_per_step'])} ms)",
            _parts(r["device_ms"]) + (" / " + _parts(r["kernel_classes"], 4) if r["kernel_classes"] else ""),
            _parts(r["host_ms"])]


PIPELINE_COLUMNS = ["preset", "batch", "dtype", "VQ dtype", "s/batch", "images/s", "sampling s", "decoding s",
                    "to PIL s", "generate() alone s", "bf16 decode s", "peak mem", "cmd"]
PROFILE_COLUMNS = ["code", "preset", "batch", "dtype", "cache", "compile", "wall ms/step", "device busy ms",
                   "device idle ms", "kernels/step", "syncs/step (wait)", "device ms/step by part / by kernel kind",
                   "host ms/step by part", "cmd"]


def _table(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def render(results, args, started):
    records = [r for rs, _, _ in results for r in rs]
    main_rows, pipeline_rows, profile_rows, commands = [], [], [], []
    for number, (rs, error, (script, cmd_args, prefix)) in enumerate(results, 1):
        commands.append(f"[{number}] `{prefix + ' ' if prefix else ''}python benchmarks/{script} {shlex.join(cmd_args)}`")
        cmd = f"[{number}]"
        for record in rs:
            if record["bench"] == "pipeline":
                pipeline_rows.append(pipeline_row(record) + [cmd])
            elif record["bench"] == "profile":
                profile_rows.append(profile_row(record) + [cmd])
            else:
                main_rows.append(row_for(record, records) + [cmd])
        if error:
            def value(flag, default="-"):
                return cmd_args[cmd_args.index(flag) + 1] if flag in cmd_args else default

            bench = "generate" if script == GEN else "train_step"
            bench = "pipeline" if "--pipeline" in cmd_args else bench
            dtype = value("--dtype", value("--precision"))
            cache = "torch.cat" if value("--impl") == "official" else value("--cache", "dynamic" if script == GEN else "-")
            compiled = "compile" if "--compile" in cmd_args else "eager"
            main_rows.append([bench, value("--preset"), value("--batch_size"), dtype, cache, compiled, "-", "-", "-",
                              "-", error.replace("|", "/"), cmd])
    lines = _table(COLUMNS, main_rows)
    if pipeline_rows:
        lines += ["", "RARPipeline.__call__ (output_type='pil', decoding included), its parts, and in the same "
                      "process generate() alone and a bfloat16 decode of as many images:", ""]
        lines += _table(PIPELINE_COLUMNS, pipeline_rows)
    if profile_rows:
        lines += ["", "Per decoding step (torch.profiler, steps from the middle of the image; the profiler slows the "
                      "host down, so wall times here exceed the timed rows'):", ""]
        lines += _table(PROFILE_COLUMNS, profile_rows)
    env = next((r for r in records), None)
    footer = []
    if any(r.get("extrapolated") for r in records):
        footer.append("\\* images/s extrapolated linearly from the generated tokens to all tokens of an image (256 for "
                      "the official sizes) "
                      "(tokens/s is the per-step throughput; later steps attend over longer prefixes, so this is "
                      "slightly optimistic).")
    scales = sorted({r["guidance_scale"] for r in records if r.get("bench") == "generate"})
    footer.append("tokens/s: image tokens per second, a guided pair counted once (CFG runs 2x the batch); "
                  f"generate rows time `model.generate` (sampling, guidance scale {', '.join(map(str, scales)) or '-'}) "
                  "without VQ decoding unless noted; s/run: seconds per call (the median of the timed runs); "
                  "train_step rows: forward + backward + clip + AdamW, images/s = samples/s.")
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        footer.append("TORCHDYNAMO_DISABLE=1: torch.compile was a no-op, 'compile' rows ran eagerly (wiring check).")
    if env:
        footer.append(f"{env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
                      f"transformers {env['transformers']}; grid `{args.grid}`, {time.perf_counter() - started:.0f} s.")
    footer += ["", "Commands:", ""] + [f"- {c}" for c in commands]
    return "\n".join(lines + [""] + footer) + "\n"


def main(argv=None):
    args = parse_args(argv)
    grid_kwargs = {k: v for k, v in dict(preset=args.preset, train_preset=args.train_preset,
                                         num_tokens=args.num_tokens, batch_sizes=args.batch_sizes,
                                         profile_steps=args.profile_steps, before_src=args.before_src).items() if v}
    if args.before_src and not Path(args.before_src, "rar_hf", "__init__.py").is_file():
        raise SystemExit(f"--before_src {args.before_src} holds no rar_hf package (expected {args.before_src}/rar_hf)")
    grid = GRIDS[args.grid](**grid_kwargs)
    if args.only:
        grid = [entry for entry in grid if entry[0] == (GEN if args.only == "generate" else TRAIN)]
    extra = shlex.split(args.extra)
    extra += ["--device", args.device] if args.device else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    started, results = time.perf_counter(), []
    for index, (script, cmd_args, timeout, *env) in enumerate(grid):
        env = env[0] if env else None
        cmd_args = cmd_args + extra
        command = [sys.executable, str(HERE / script), *cmd_args, "--json"]
        timeout *= args.timeout_scale
        label = f"[{index + 1}/{len(grid)}] {script} {' '.join(cmd_args)}"
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        if args.dry_run:
            print((prefix + " " if prefix else "") + shlex.join(command) + f"   # timeout {timeout:.0f} s")
            continue
        if args.budget is not None:
            left = args.budget - (time.perf_counter() - started)
            if left < 30:
                print(f"{label}: skipped (time budget)", flush=True)
                results.append(([], "skipped: time budget spent", (script, cmd_args, prefix)))
                continue
            timeout = min(timeout, left)
        print(f"{label} ...", flush=True)
        if args.in_process and not env:
            records, error = run_in_process(script, cmd_args)
        else:  # another PYTHONPATH (older code) needs its own process
            records, error = run_one(command, timeout, env)
        print(f"    {'ok' if not error else error} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        results.append((records, error, (script, cmd_args, prefix)))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(render(results, args, started))
    if args.dry_run:
        return
    table = render(results, args, started)
    print("\n" + table)
    if args.output:
        Path(args.output).write_text(table)
    if args.json_output:
        Path(args.json_output).write_text(json.dumps([r for rs, _, _ in results for r in rs], indent=1))
    if not any(rs for rs, _, _ in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
