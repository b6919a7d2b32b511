"""Adapting a pretrained RAR to new classes: full fine-tuning vs LoRA vs from scratch, at the same step budget.

What is pre-trained: the digits generator of `examples/tiny_digits/rar_config.json` (width 128, 4 layers, 1.3M
parameters) trained from scratch by `examples/train_rar.py` on the digits 0-4 only (the training images of those
classes in `rar_hf.data.digits`' split, 32x32, tokenised once by `examples/pretokenize.py` with the shipped VQ model:
8x8 tokens of 256 codes) for `--pretrain_steps` steps at batch 64, learning rate 1e-3 (the script's schedule: warm-up
25%, random orders annealed to raster from 50% to 75% of the run), seed 0. It is written to WORK/pretrained-0-4 and
reused by later runs of this script (`--retrain_base` trains it again).

Adaptation: the digits 5-9 (class names "5".."9", none shared with the pretrained model), `--adapt_steps` steps for
every row, with the same data order, batch (64), schedule and seed; rows differ only in what they start from and train:

- scratch: a new model of the same architecture (what `train_rar.py` builds without `--pretrained_model`);
- full fine-tuning from the pretrained pipeline, its five new class embeddings initialised three ways
  (`--new_class_init null | mean | random`, see `rar_hf.finetuning.adapt_classes`);
- LoRA (`--lora_rank 8`, alpha 8, the default target modules, the class rows trained whole), at the same learning rate
  and at 3x and 10x (LoRA's updates are small and usually want a larger one).

`--seeds` repeats every row with other training seeds (data order, dropout, new class rows; the pretrained model
stays the one of seed 0).

Judge: `benchmarks/digits_quality.py`'s `DigitsJudge` (an SVC trained on the real training digits of all ten classes;
accuracy = it reads the digit asked for) on `--num_per_class` generated digits per class and guidance scale, and the
Frechet distance of PCA-16 features against the held-out real digits 5-9 (for the pretrained model: 0-4). Costs: the
parameters that train, the bytes of their gradients and AdamW moments (3 x 4 bytes each), the peak RSS of the training
process and its wall time (each run in its own process, started by this one).

    OMP_NUM_THREADS=2 flock /tmp/rar-cpu.lock python benchmarks/adaptation.py --work_dir outputs/adaptation \
        --output_json outputs/adaptation.json                   # ~25 min on 2 cores (pre-training ~8 of them)
    python benchmarks/adaptation.py --work_dir /tmp/a --pretrain_steps 2 --adapt_steps 2 --num_per_class 2 \
        --in_process                                            # every code path, under a minute
"""

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_quality import SHIPPED, DigitsJudge  # noqa: E402

from rar_hf.data.digits import DIGITS_MAX_VALUE, images_to_digits, split_digits  # noqa: E402
from rar_hf.metrics.fid import compute_statistics, frechet_distance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRETRAINED_DIGITS, NEW_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
COMMON = ["--train_batch_size", "64", "--learning_rate", "1e-3", "--report_to", "none", "--logging_steps", "25"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="outputs/adaptation", help="Data, the pretrained model and the runs go here.")
    p.add_argument("--pretrain_steps", type=int, default=600, help="Steps of the pretrained model (digits 0-4).")
    p.add_argument("--adapt_steps", type=int, default=150, help="Steps of every adaptation row (digits 5-9).")
    p.add_argument("--rows", nargs="+", default=None, help="Only these rows (names as in the table).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Training seeds of every row (the table: mean, min-max).")
    p.add_argument("--num_per_class", type=int, default=100, help="Generated digits per class and guidance scale.")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0], help="Guidance scales judged.")
    p.add_argument("--batch_size", type=int, default=250, help="Images per pipeline call.")
    p.add_argument("--retrain_base", action="store_true", help="Train the pretrained model again even if WORK has it.")
    p.add_argument("--in_process", action="store_true", help="Train in this process (no peak RSS; for smoke tests).")
    p.add_argument("--output_json", default=None, help="Also write the results here.")
    p.add_argument("--_child", nargs=2, metavar=("ARGV_JSON", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(argv: list[str], in_process: bool, result_path: Path) -> dict:
    """Run examples/train_rar.py with `argv`: `{"seconds", "peak_rss_mb"}` (peak RSS: None in-process)."""
    if in_process:
        train_rar = load_example("train_rar")
        start = time.perf_counter()
        train_rar.main(train_rar.parse_args(argv))
        return {"seconds": time.perf_counter() - start, "peak_rss_mb": None}
    subprocess.run([sys.executable, __file__, "--_child", json.dumps(argv), str(result_path)], check=True)
    return json.loads(result_path.read_text())


def child(argv_json: str, result: str) -> None:
    train_rar = load_example("train_rar")
    args = train_rar.parse_args(json.loads(argv_json))
    start = time.perf_counter()
    train_rar.main(args)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    Path(result).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def prepare_data(work: Path) -> dict[tuple, Path]:
    """Pre-tokenised digits 0-4 and 5-9 (train split), each a ClassLabel of its digits' names."""
    import datasets

    from rar_hf.data.digits import build_digits_dataset

    pretokenize = load_example("pretokenize")
    folders = {}
    digits = None
    for group in (PRETRAINED_DIGITS, NEW_DIGITS):
        tag = f"{group[0]}-{group[-1]}"
        tokens = work / f"tokens-{tag}"
        folders[group] = tokens
        if (tokens / "rar_pretokenized-train.json").is_file():
            continue
        digits = digits or build_digits_dataset(image_size=32)
        train = digits["train"].filter(lambda row: row["label"] in group)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in group])})
        train = train.map(lambda row: {"label": row["label"] - group[0]}, features=features)
        images = work / f"images-{tag}" / "data" / "train-00000-of-00001.parquet"
        images.parent.mkdir(parents=True, exist_ok=True)
        train.to_parquet(str(images))
        pretokenize.main(pretokenize.parse_args([
            "--dataset_name", str(images.parent.parent), "--vqvae", str(SHIPPED / "vqvae"), "--augmentation", "center",
            "--num_shards", "1", "--output_dir", str(tokens),
        ]))  # fmt: skip
    return folders


def adaptation_rows(base: Path, steps: int) -> dict[str, list[str]]:
    scratch = ["--model_config", str(REPO / "examples" / "tiny_digits" / "rar_config.json"), "--vqvae", str(SHIPPED / "vqvae")]
    lora = ["--pretrained_model", str(base), "--lora_rank", "8", "--lora_alpha", "8"]
    return {
        "scratch": scratch,
        "full, null init": ["--pretrained_model", str(base), "--new_class_init", "null"],
        "full, mean init": ["--pretrained_model", str(base), "--new_class_init", "mean"],
        "full, random init": ["--pretrained_model", str(base), "--new_class_init", "random"],
        "LoRA r=8": lora,
        "LoRA r=8, lr 3e-3": [*lora, "--learning_rate", "3e-3"],
        "LoRA r=8, lr 1e-2": [*lora, "--learning_rate", "1e-2"],
    }


def trainable_parameters(run: Path) -> int:
    from safetensors import safe_open

    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").is_file() else "transformer/model.safetensors"
    with safe_open(str(run / name), framework="pt") as f:
        return sum(int(np.prod(f.get_slice(key).get_shape())) for key in f.keys())


def load_pipeline(run: Path):
    from rar_hf import RARPipeline
    from rar_hf.run_folder import load_lora_pipeline

    pipe = load_lora_pipeline(run) if (run / "adapter_model.safetensors").is_file() else RARPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def judge_pipeline(pipe, judge, reference, scales, num_per_class, batch_size) -> list[dict]:
    """Per guidance scale: accuracy (the classifier reads the digit the class names) and the Frechet distance."""
    ids = np.repeat(np.arange(pipe.transformer.config.num_classes), num_per_class)
    wanted = np.array([int(pipe.id2label[i]) for i in ids])
    rows = []
    for scale in scales:
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        images = [
            pipe(class_labels=ids[i : i + batch_size].tolist(), guidance_scale=scale, generator=generator, output_type="pt").images.float()
            for i in range(0, len(ids), batch_size)
        ]
        digits = images_to_digits(torch.cat(images))
        features = compute_statistics(judge.pca.transform(digits / DIGITS_MAX_VALUE))
        accuracy = float((judge.classifier.predict(digits) == wanted).mean())
        rows.append({"guidance_scale": scale, "accuracy": accuracy, "frechet": float(frechet_distance(*features, *reference)),
                     "sampling_seconds": time.perf_counter() - start})  # fmt: skip
    return rows


def main(args):
    if args._child:
        return child(*args._child)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    judge = DigitsJudge()

    def reference(group):
        held_out = judge.test_x[np.isin(judge.test_y, group)]
        return compute_statistics(judge.pca.transform(held_out / DIGITS_MAX_VALUE))

    base = work / "pretrained-0-4"
    base_record = work / "pretrained-0-4.json"
    if args.retrain_base or not base_record.is_file():
        argv = ["--pretokenized_dataset", str(data[PRETRAINED_DIGITS]), "--model_config", str(REPO / "examples" / "tiny_digits" / "rar_config.json"),
                "--vqvae", str(SHIPPED / "vqvae"), "--max_train_steps", str(args.pretrain_steps), "--checkpointing_steps",
                str(args.pretrain_steps), "--output_dir", str(base), "--overwrite_output_dir", "--seed", "0", *COMMON]  # fmt: skip
        cost = train(argv, args.in_process, work / "child.json")
        base_record.write_text(json.dumps({"steps": args.pretrain_steps, "argv": argv, **cost}, indent=2))
    pretrained = json.loads(base_record.read_text())
    results = {"pretrained": {**pretrained, "quality": judge_pipeline(load_pipeline(base), judge, reference(PRETRAINED_DIGITS),
                                                                      args.guidance_scales, args.num_per_class, args.batch_size)}}  # fmt: skip
    new = np.isin(judge.test_y, NEW_DIGITS)
    train_x, train_y = split_digits()["train"]
    train_new = train_x.reshape(-1, 64)[np.isin(train_y, NEW_DIGITS)] / DIGITS_MAX_VALUE
    results["real held-out 5-9"] = {
        "accuracy": float((judge.classifier.predict(judge.test_x[new]) == judge.test_y[new]).mean()),
        "frechet_train_vs_held_out": float(frechet_distance(*compute_statistics(judge.pca.transform(train_new)), *reference(NEW_DIGITS))),
    }
    rows = adaptation_rows(base, args.adapt_steps)
    results["adaptation"] = []
    unknown = set(args.rows or ()) - set(rows)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; the rows are {list(rows)}")
    for name, extra in rows.items():
        if args.rows and name not in args.rows:
            continue
        for seed in args.seeds:
            run = work / "runs" / f"{name.replace(', ', '-').replace(' ', '-').replace('=', '')}-seed{seed}"
            argv = ["--pretokenized_dataset", str(data[NEW_DIGITS]), "--max_train_steps", str(args.adapt_steps),
                    "--checkpointing_steps", str(args.adapt_steps), "--output_dir", str(run), "--overwrite_output_dir",
                    *COMMON, "--seed", str(seed), *extra]  # fmt: skip
            cost = train(argv, args.in_process, work / "child.json")
            trainable = trainable_parameters(run)
            quality = judge_pipeline(load_pipeline(run), judge, reference(NEW_DIGITS), args.guidance_scales, args.num_per_class, args.batch_size)
            final_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
            results["adaptation"].append({"row": name, "seed": seed, "argv": argv, "trainable_parameters": trainable,
                                          "optimizer_and_gradient_bytes": 12 * trainable, "final_loss": final_loss,
                                          **cost, "quality": quality})  # fmt: skip
    print_table(results, args)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


def print_table(results, args):
    pre = results["pretrained"]
    quality = ", ".join(f"guidance {q['guidance_scale']:g}: accuracy {q['accuracy']:.3f}, Frechet {q['frechet']:.3f}" for q in pre["quality"])
    print(f"pretrained on digits 0-4: {pre['steps']} steps in {pre['seconds']:.0f} s; on 0-4: {quality}")
    real = results["real held-out 5-9"]
    print(f"real held-out 5-9: accuracy {real['accuracy']:.3f}; Frechet(train 5-9, held-out 5-9) {real['frechet_train_vs_held_out']:.3f}")
    scales = args.guidance_scales
    seeds = f", seeds {' '.join(map(str, args.seeds))}: mean (min-max)" if len(args.seeds) > 1 else ""
    head = " | ".join(f"accuracy, guidance {s:g} | Frechet, guidance {s:g}" for s in scales)
    print(f"| row ({args.adapt_steps} steps on 5-9{seeds}) | {head} | final loss | trainable parameters | grads + AdamW | peak RSS | wall time |")
    print("|---|" + "---|" * (2 * len(scales) + 5))

    def spread(values, digits=3):
        text = f"{np.mean(values):.{digits}f}"
        return text + (f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else "")

    for name in dict.fromkeys(row["row"] for row in results["adaptation"]):
        runs = [row for row in results["adaptation"] if row["row"] == name]
        cells = " | ".join(f"{spread([r['quality'][i]['accuracy'] for r in runs])} | {spread([r['quality'][i]['frechet'] for r in runs])}"
                           for i in range(len(scales)))  # fmt: skip
        rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
        rss = f"{max(rss):.0f} MB" if rss else "-"
        print(f"| {name} | {cells} | {spread([r['final_loss'] for r in runs])} | {runs[0]['trainable_parameters']:,} | "
              f"{runs[0]['optimizer_and_gradient_bytes'] / 2**20:.2f} MiB | {rss} | {np.median([r['seconds'] for r in runs]):.0f} s |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(parse_args()))
