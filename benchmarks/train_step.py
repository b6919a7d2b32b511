"""Training throughput of RAR: one optimizer step (forward + backward + grad clipping + AdamW) on random data.

    python benchmarks/train_step.py --preset rar-b --batch_size 8 --precision bf16
    python benchmarks/train_step.py --preset tiny --steps 1                               # smoke test (seconds)

The step is the one of examples/train_rar.py: float32 master weights, `--precision bf16` = torch.autocast(bfloat16)
as accelerate's mixed precision does, AdamW(lr 4e-4, betas (0.9, 0.96), weight decay 0.03 on linear weights only),
gradient clipping at 1.0, dropout on (train mode). Batches are random pre-tokenised images collated by
rar_hf.data.RARDataCollator at step 0, where the randomness ratio r is 1: every sample gets its own random
permutation (the realistic case for most of training; raster order costs the same). Collation is done before the
clock starts (a DataLoader does it in parallel). tokens/s = batch x image_seq_len / median step time; images/s =
batch / median step time. Peak memory as in generate.py (CUDA allocator peak, or process peak RSS on CPU).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import PRESETS, build_model, default_device, emit, environment, peak_memory, reset_peak_memory, time_runs  # noqa: E402


def build_optimizer(model, learning_rate=4e-4, betas=(0.9, 0.96), weight_decay=0.03):
    """Same parameter groups as examples/train_rar.py: decay only the weights of linear layers."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def random_batches(config, batch_size: int, count: int, seed: int, device):
    from rar_hf.data.collator import RARDataCollator  # see generate.ensure_rar_hf (imported via build_model)

    collator = RARDataCollator(codebook_size=config.codebook_size, num_classes=config.num_classes,
                               latent_size=tuple(config.latent_size), class_dropout_prob=config.class_dropout_prob,
                               seed=seed)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, config.codebook_size, (batch_size, config.image_seq_len), generator=generator)
        labels = torch.randint(0, config.num_classes, (batch_size,), generator=generator)
        batch = collator([{"tokens": t, "label": int(c)} for t, c in zip(tokens, labels)])
        assert float(batch.pop("randomness_ratio")) == 1.0, "expected r = 1 (random orders) at the first steps"
        batch.pop("step")
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rar-b", choices=PRESETS, help="Model size (random weights).")
    p.add_argument("--batch_size", type=int, default=8, help="Samples per step (one process).")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 = torch.autocast(bfloat16).")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    p.add_argument("--steps", "--repeats", dest="steps", type=int, default=3, help="Timed steps; the median is reported.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps first (allocates the AdamW state).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables).")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    p.add_argument("--seed", type=int, default=0, help="Seed of weights and data.")
    p.add_argument("--json", action="store_true", help="Print a JSON record instead of a text line.")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.preset, torch.float32, device, seed=args.seed).train()
    if args.gradient_checkpointing:
        # transformers 5.x renamed it (gradient_checkpointing_enable is deprecated).
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    config = model.config
    optimizer = build_optimizer(model)
    batches = iter(random_batches(config, args.batch_size, args.warmup + args.steps, args.seed, device))
    losses = []

    def step():
        batch = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    reset_peak_memory(device)
    times = time_runs(step, device, args.steps, args.warmup)
    seconds = statistics.median(times)
    mem, mem_kind = peak_memory(device)
    loss = float(losses[-1])
    if not torch.isfinite(torch.tensor(loss)):
        raise SystemExit(f"non-finite loss {loss}")
    emit({
        "bench": "train_step", "preset": args.preset, "batch_size": args.batch_size, "precision": args.precision,
        "dtype": args.precision, "cache": "-", "compile": "eager",
        "gradient_checkpointing": args.gradient_checkpointing, "image_seq_len": config.image_seq_len,
        "seconds": seconds, "all_seconds": times, "tokens_per_s": args.batch_size * config.image_seq_len / seconds,
        "images_per_s": args.batch_size / seconds, "loss": loss, "peak_mem_bytes": mem, "peak_mem_kind": mem_kind,
        **environment(device),
    }, args.json)


if __name__ == "__main__":
    main()
