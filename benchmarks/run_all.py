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


def gpu_grid(preset="rar-xl", train_preset="rar-b", num_tokens=None, batch_sizes=(128, 256), **_):
    """RAR-XL sampling (bf16/fp32, dynamic/static cache, eager/compiled) and a RAR-B bf16 training step, in order of
    priority so that a time budget cuts the least important configurations."""
    small, large = (str(b) for b in batch_sizes)

    def gen(batch, dtype, cache, compiled=False, timeout=180):
        args = ["--preset", preset, "--batch_size", batch, "--dtype", dtype, "--guidance_scale", "2.0", "--repeats", "3"]
        args += ["--num_tokens", str(num_tokens)] if num_tokens else []
        args += ["--impl", "official"] if cache == "official" else ["--cache", cache]
        return (GEN, args + (["--compile"] if compiled else []), 420 if compiled else timeout)

    return [
        gen(small, "bfloat16", "static", compiled=True),  # the headline: CUDA graphs (goal >= 100 images/s)
        gen(small, "bfloat16", "dynamic"),  # the default path
        (TRAIN, ["--preset", train_preset, "--batch_size", "64", "--precision", "bf16", "--steps", "5"], 180),
        gen(small, "float32", "official"),  # the paper's Table 5 setting (fp32, batch 128), official cost structure
        gen(small, "float32", "dynamic"),
        gen(small, "bfloat16", "static"),
        gen(large, "bfloat16", "static", compiled=True),
        gen(large, "bfloat16", "dynamic"),
        gen(small, "float32", "static", compiled=True),
        gen(small, "float32", "static"),
        gen(small, "bfloat16", "dynamic", compiled=True),
        gen(large, "float32", "dynamic"),
        gen(small, "bfloat16", "official"),
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
COLUMNS = ["bench", "preset", "batch", "dtype", "cache", "compile", "tokens/s", "images/s", "peak mem", "notes"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="cpu", choices=sorted(GRIDS), help="Which grid to run.")
    p.add_argument("--preset", default=None, help="Sampling model preset (grid default: cpu rar-b, gpu rar-xl).")
    p.add_argument("--train_preset", default=None, help="Training-step preset (grid default: same / rar-b).")
    p.add_argument("--num_tokens", type=int, default=None, help="gpu grid: tokens per image (default: all).")
    p.add_argument("--batch_sizes", type=int, nargs=2, default=None, help="gpu grid: the two sampling batch sizes.")
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


def run_one(command, timeout):
    """(records, error): the JSON records the command printed, or why there are none."""
    start = time.perf_counter()
    # A new session, so that a timeout kills the whole process group (torch.compile's worker processes too).
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=HERE.parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return [], f"timeout after {timeout:.0f} s"
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for line in out.splitlines():
        if not line.startswith("{") and line.strip():
            print(f"    {line}", flush=True)
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
        return [], f"{type(error).__name__}: {error} / {traceback.format_exc().strip().splitlines()[-1][-200:]}"
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")], None


def fmt_mem(record):
    num = record["peak_mem_bytes"]
    text = f"{num / 2**30:.2f} GiB" if num >= 2**30 else f"{num / 2**20:.0f} MiB"
    return text + ("" if record["peak_mem_kind"].startswith("cuda") else " (RSS)")


def row_for(record, records):
    if record["bench"] == "train_step":
        notes = "fwd+bwd+AdamW" + (", grad ckpt" if record["gradient_checkpointing"] else "")
        return ["train_step", record["preset"], record["batch_size"], record["precision"], "-", "eager",
                f"{record['tokens_per_s']:,.0f}", f"{record['images_per_s']:.2f}", fmt_mem(record), notes]
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
    cache = "torch.cat" if record["impl"] == "official" else record["cache"]
    return [bench, record["preset"], record["batch_size"], record["dtype"], cache, record["compile"],
            f"{record['tokens_per_s']:,.1f}", images, fmt_mem(record), ", ".join(notes)]


def render(results, args, started):
    records = [r for rs, _, _ in results for r in rs]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rs, error, (script, cmd_args) in results:
        for record in rs:
            lines.append("| " + " | ".join(str(c) for c in row_for(record, records)) + " |")
        if error:
            def value(flag, default="-"):
                return cmd_args[cmd_args.index(flag) + 1] if flag in cmd_args else default

            bench = "generate" if script == GEN else "train_step"
            dtype = value("--dtype", value("--precision"))
            cache = "torch.cat" if value("--impl") == "official" else value("--cache", "dynamic" if script == GEN else "-")
            compiled = "compile" if "--compile" in cmd_args else "eager"
            lines.append(f"| {bench} | {value('--preset')} | {value('--batch_size')} | {dtype} | {cache} | {compiled} "
                         f"| - | - | - | {error.replace('|', '/')} |")
    env = next((r for r in records), None)
    footer = []
    if any(r.get("extrapolated") for r in records):
        footer.append("\\* images/s extrapolated linearly from the generated tokens to all tokens of an image (256 for "
                      "the official sizes) "
                      "(tokens/s is the per-step throughput; later steps attend over longer prefixes, so this is "
                      "slightly optimistic).")
    footer.append("tokens/s: image tokens per second, a guided pair counted once (CFG runs 2x the batch); "
                  "generate rows time `model.generate` (sampling, guidance scale 2.0) without VQ decoding unless noted; "
                  "train_step rows: forward + backward + clip + AdamW, images/s = samples/s.")
    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        footer.append("TORCHDYNAMO_DISABLE=1: torch.compile was a no-op, 'compile' rows ran eagerly (wiring check).")
    if env:
        footer.append(f"{env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
                      f"transformers {env['transformers']}; grid `{args.grid}`, {time.perf_counter() - started:.0f} s.")
    return "\n".join(lines + [""] + footer) + "\n"


def main(argv=None):
    args = parse_args(argv)
    grid_kwargs = {k: v for k, v in dict(preset=args.preset, train_preset=args.train_preset,
                                         num_tokens=args.num_tokens, batch_sizes=args.batch_sizes).items() if v}
    grid = GRIDS[args.grid](**grid_kwargs)
    if args.only:
        grid = [entry for entry in grid if entry[0] == (GEN if args.only == "generate" else TRAIN)]
    extra = shlex.split(args.extra)
    extra += ["--device", args.device] if args.device else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    started, results = time.perf_counter(), []
    for index, (script, cmd_args, timeout) in enumerate(grid):
        cmd_args = cmd_args + extra
        command = [sys.executable, str(HERE / script), *cmd_args, "--json"]
        timeout *= args.timeout_scale
        label = f"[{index + 1}/{len(grid)}] {script} {' '.join(cmd_args)}"
        if args.dry_run:
            print(shlex.join(command) + f"   # timeout {timeout:.0f} s")
            continue
        if args.budget is not None:
            left = args.budget - (time.perf_counter() - started)
            if left < 30:
                print(f"{label}: skipped (time budget)", flush=True)
                results.append(([], "skipped: time budget spent", (script, cmd_args)))
                continue
            timeout = min(timeout, left)
        print(f"{label} ...", flush=True)
        records, error = run_in_process(script, cmd_args) if args.in_process else run_one(command, timeout)
        print(f"    {'ok' if not error else error} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        results.append((records, error, (script, cmd_args)))
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
