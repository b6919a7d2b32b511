#!/usr/bin/env python
"""Train a RAR generator with 🤗 Accelerate.

One GPU or CPU:      accelerate launch examples/train_rar.py --pretokenized_dataset DIR --output_dir out
8 GPUs on one node:  accelerate launch --multi_gpu --num_processes 8 examples/train_rar.py ...
Several nodes:       accelerate launch --config_file examples/accelerate_configs/multi_node.yaml examples/train_rar.py ...

Data comes either pre-tokenised (`--pretokenized_dataset`: parquet / datasets folder / Hub id / official
`maskgitvq.jsonl`, see examples/pretokenize.py) or as images (`--dataset_name`, optionally `--streaming`) that the
frozen tokenizer given by `--vqvae` turns into tokens on each process's device. The defaults are the paper's recipe.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.data import RARDataCollator
from rar_hf.training_utils import (
    checkpoint_step,
    finish_uploads,
    resolve_checkpoint,
    save_checkpoint,
    truncate_metrics,
)

logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--pretokenized_dataset", default=None, help="Pre-tokenised data: folder, parquet glob, Hub id or official .jsonl.")
    data.add_argument("--dataset_name", default=None, help="Image dataset (Hub id, folder or parquet files) tokenised on the fly with --vqvae.")
    data.add_argument("--dataset_split", default="train", help="Split to train on.")
    data.add_argument("--streaming", action="store_true", help="Stream --dataset_name instead of downloading it whole.")
    data.add_argument("--image_column", default="image", help="Image column of --dataset_name ('jpg' for timm/imagenet-1k-wds).")
    data.add_argument("--label_column", default="label", help="Label column ('cls' for timm/imagenet-1k-wds).")
    data.add_argument("--resolution", type=int, default=256, help="Image size for on-the-fly tokenising (ADM centre crop).")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips for on-the-fly tokenising.")
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer of streamed datasets.")
    data.add_argument("--vqvae", default=None, help="MaskGITVQModel folder or Hub id: tokenises images on the fly and is saved with the final pipeline.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")

    model = p.add_argument_group("model")
    model.add_argument("--model_config", default="rar-b", help="A preset (rar-b, rar-l, rar-xl, rar-xxl) or a config.json path.")
    model.add_argument("--pretrained_model", default=None, help="Start from these RARForImageGeneration weights instead of scratch.")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    model.add_argument("--scan_order", default="raster", help="Final scan order the annealing converges to (raster, spiral_in, ...).")
    model.add_argument("--class_dropout_prob", type=float, default=0.1, help="Class-label dropout (trains the null class for guidance).")

    optim = p.add_argument_group("optimisation (defaults: the paper's recipe)")
    optim.add_argument("--train_batch_size", type=int, default=2048, help="Batch size per process per micro-step (paper: 2048 in total).")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    optim.add_argument("--max_train_steps", type=int, default=250_000, help="Optimizer steps.")
    optim.add_argument("--learning_rate", type=float, default=4e-4, help="Peak learning rate.")
    optim.add_argument("--min_learning_rate", type=float, default=1e-5, help="Learning rate at the end of the cosine.")
    optim.add_argument("--lr_scheduler", default="cosine_with_min_lr", help="transformers scheduler name.")
    optim.add_argument("--lr_warmup_steps", type=int, default=62_500, help="Linear warm-up steps.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, default=0.96, help="AdamW beta2.")
    optim.add_argument("--weight_decay", type=float, default=0.03, help="Weight decay (not on norms, biases, embeddings).")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping.")
    optim.add_argument("--anneal_start", type=int, default=125_000, help="Step where the random-order probability starts to fall from 1.")
    optim.add_argument("--anneal_end", type=int, default=187_500, help="Step where it reaches 0 (pure scan order).")
    optim.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Overrides accelerate's config.")
    optim.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (diffusers EMAModel) and save it.")
    optim.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay.")
    optim.add_argument("--seed", type=int, default=0, help="Seed of weights, data order, permutations and dropout.")

    out = p.add_argument_group("outputs")
    out.add_argument("--output_dir", default="rar-output", help="Where checkpoints, metrics.jsonl and the final model go.")
    out.add_argument("--checkpointing_steps", type=int, default=5000, help="Save a resumable checkpoint every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    out.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder or 'latest'.")
    out.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    out.add_argument("--logging_steps", type=int, default=50, help="Log every N steps (trackers and metrics.jsonl).")
    out.add_argument("--validation_steps", type=int, default=None, help="Log a sample grid every N steps (needs --vqvae).")
    out.add_argument("--validation_class_labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279], help="Classes of the sample grid.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload checkpoints (in the background) and the final model.")
    out.add_argument("--hub_model_id", default=None, help="Hub repo for --push_to_hub (default: output_dir's name).")
    out.add_argument("--hub_private", action="store_true", help="Create the Hub repo as private.")
    args = p.parse_args(argv)
    if (args.pretokenized_dataset is None) == (args.dataset_name is None):
        p.error("give exactly one of --pretokenized_dataset and --dataset_name")
    if args.dataset_name is not None and args.vqvae is None:
        p.error("--dataset_name needs --vqvae to tokenise images on the fly")
    return args


def build_config(args, vqvae) -> RARConfig:
    overrides = {"class_dropout_prob": args.class_dropout_prob}
    if vqvae is not None:
        factor = vqvae.downsample_factor
        overrides.update(codebook_size=vqvae.config.codebook_size, latent_size=[args.resolution // factor] * 2)
        overrides["image_seq_len"] = (args.resolution // factor) ** 2
    if Path(args.model_config).is_file():
        config = RARConfig.from_json_file(args.model_config)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    return RARConfig.from_preset(args.model_config, **overrides)


def build_optimizer(model, args):
    # Decay only the weights of linear layers: not norms, biases, embeddings or position tables (the recipe).
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decay], "weight_decay": args.weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))


class MetricsWriter:
    """One JSON line per logging step in output_dir/metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            truncate_metrics(path, resume_step)

    def write(self, record: dict):
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def pretokenized_batches(args, accelerator, collator, batch_size, start_batch):
    """Yield collated batches of a map-style pre-tokenised dataset from global batch `start_batch` on, forever.

    Each epoch is a seeded DistributedSampler permutation; resuming skips batches in the sampler, so nothing is
    re-read and the collator (whose randomness depends on the batch index alone) replays the same batches.
    """
    from rar_hf.data import load_pretokenized_dataset

    dataset = load_pretokenized_dataset(args.pretokenized_dataset, split=args.dataset_split)
    sampler = DistributedSampler(
        dataset,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        # Its own generator: creating an iterator would otherwise draw from the global RNG (which dropout uses)
        # at different times in a resumed and an uninterrupted run.
        generator=torch.Generator().manual_seed(args.seed),
    )
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(
            f"{args.pretokenized_dataset} has {len(dataset)} rows: fewer than one batch of {batch_size} per process "
            f"({accelerator.num_processes} processes)."
        )
    batch_index = start_batch
    while True:
        epoch, skip = divmod(batch_index, per_epoch)
        sampler.set_epoch(epoch)
        collator.set_start_batch(batch_index)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            yield batch
            batch_index += 1


def image_batches(args, accelerator, collator, batch_size, start_batch, vqvae, skip_counter):
    """Yield collated batches of images tokenised on the fly by the frozen `vqvae`, from `start_batch` on.

    Resuming re-reads (but does not tokenise) the skipped batches, which keeps the seeded shuffle exact.
    """
    from rar_hf.data import ImageTransform, decode_images, load_image_dataset, split_and_shuffle

    dataset = load_image_dataset(
        args.dataset_name,
        split=args.dataset_split,
        streaming=args.streaming,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    dataset = split_and_shuffle(
        dataset,
        accelerator.process_index,
        accelerator.num_processes,
        seed=args.seed,
        buffer_size=args.shuffle_buffer_size,
    )
    transform = ImageTransform(args.resolution, random_flip=args.random_flip, seed=args.seed + accelerator.process_index)
    rows = decode_images(dataset, transform, skip_counter=skip_counter)
    batch_index, epoch = 0, 0
    while True:
        rows.set_epoch(epoch)
        loader = DataLoader(
            rows,
            batch_size=batch_size,
            num_workers=args.dataloader_num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(args.seed + epoch),
        )
        for batch in loader:
            if batch_index >= start_batch:
                pixels = batch["pixel_values"].to(accelerator.device, dtype=vqvae.dtype)
                with torch.no_grad():
                    tokens = vqvae.encode(pixels).indices.cpu()
                features = [{"tokens": t, "label": int(label)} for t, label in zip(tokens, batch["label"])]
                yield collator.collate(features, batch_index)
            batch_index += 1
        epoch += 1
        if batch_index == 0:
            raise ValueError(f"{args.dataset_name} yields fewer than one batch of {batch_size} per process.")


def log_validation(accelerator, model, vqvae, args, step):
    from rar_hf.pipeline_rar import RARPipeline

    pipeline = RARPipeline(transformer=accelerator.unwrap_model(model), vqvae=vqvae)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = pipeline.transformer.config.num_classes
    labels = [c % num_classes for c in args.validation_class_labels]
    generator = torch.Generator().manual_seed(args.seed)
    was_training = model.training
    model.eval()
    images = pipeline(class_labels=labels, generator=generator, output_type="np").images
    model.train(was_training)
    sample_dir = Path(args.output_dir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import make_image_grid, numpy_to_pil

    make_image_grid(numpy_to_pil(images), rows=1, cols=len(images)).save(sample_dir / f"step-{step}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=str(label)) for image, label in zip(images, labels)]})


def main(args):
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    hub_repo, pending_uploads = None, []  # pending: background checkpoint uploads (futures)
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        hub_repo = create_repo(args.hub_model_id or output_dir.name, private=args.hub_private, exist_ok=True).repo_id

    vqvae = None
    if args.vqvae is not None:
        from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

        vqvae = MaskGITVQModel.from_pretrained(args.vqvae).to(accelerator.device).eval().requires_grad_(False)
    if args.pretrained_model is not None:
        model = RARForImageGeneration.from_pretrained(args.pretrained_model)
    else:
        model = RARForImageGeneration(build_config(args, vqvae))
    if args.gradient_checkpointing:
        # activation_checkpointing_enable is the name since transformers 5.2x; gradient_checkpointing_enable before.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    config = model.config
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=RARForImageGeneration, model_config=config)

    optimizer = build_optimizer(model, args)
    # Prepared schedulers step once per process per optimizer step; give them steps x processes accordingly.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        scheduler_specific_kwargs={"min_lr": args.min_learning_rate} if "min_lr" in args.lr_scheduler else None,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    global_step = 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
        logger.info("Resumed from %s at step %d.", checkpoint, global_step)
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s: starting from scratch.", output_dir)

    collator = RARDataCollator(
        codebook_size=config.codebook_size,
        num_classes=config.num_classes,
        latent_size=tuple(config.latent_size),
        anneal_start=args.anneal_start,
        anneal_end=args.anneal_end,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        class_dropout_prob=args.class_dropout_prob,
        scan_order=args.scan_order,
        seed=args.seed,
        rank=accelerator.process_index,
    )
    start_batch = global_step * args.gradient_accumulation_steps
    skip_counter = None
    if args.pretokenized_dataset is not None:
        batches = pretokenized_batches(args, accelerator, collator, args.train_batch_size, start_batch)
    else:
        from rar_hf.data import SkipCounter

        skip_counter = SkipCounter()
        batches = image_batches(args, accelerator, collator, args.train_batch_size, start_batch, vqvae, skip_counter)

    if accelerator.is_main_process:
        accelerator.init_trackers("rar", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    metrics = MetricsWriter(output_dir / "metrics.jsonl", accelerator.is_main_process, global_step)
    tokens_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes * config.image_seq_len
    logger.info(
        "Training %.1fM parameters for %d steps, %d processes x %d samples x %d accumulation.",
        sum(p.numel() for p in model.parameters()) / 1e6,
        args.max_train_steps,
        accelerator.num_processes,
        args.train_batch_size,
        args.gradient_accumulation_steps,
    )
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    model.train()
    loss_sum, loss_count, window_start = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    window_steps, first_batch_fingerprint = 0, None
    while global_step < args.max_train_steps:
        batch = next(batches)
        if first_batch_fingerprint is None:
            first_batch_fingerprint = float((batch["input_ids"] * 31 + batch["orders"][:, :1]).double().sin().sum())
        ratio = float(batch.pop("randomness_ratio"))
        batch_step = int(batch.pop("step"))
        assert batch_step == global_step, f"collator step {batch_step} != optimizer step {global_step}"
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        loss_count += 1
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        window_steps += 1
        progress.update(1)
        if ema is not None:
            ema.step(model.parameters())
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            mean_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
            elapsed = time.perf_counter() - window_start
            record = {
                "step": global_step,
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "randomness_ratio": ratio,  # r of the batch of the step just completed: r(step - 1)
                "tokens_per_second": tokens_per_step * window_steps / elapsed,
                "skipped_images": skip_counter.count if skip_counter is not None else 0,
            }
            accelerator.log(record, step=global_step)
            metrics.write(record)
            progress.set_postfix(loss=f"{mean_loss:.4f}", r=f"{ratio:.3f}")
            loss_sum.zero_()
            loss_count, window_steps, window_start = 0, 0, time.perf_counter()
        if global_step % args.checkpointing_steps == 0:
            # The rotation in save_checkpoint may delete a checkpoint that a background upload is still reading.
            finish_uploads(pending_uploads)
            path = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if hub_repo is not None:
                from huggingface_hub import upload_folder

                upload = upload_folder(repo_id=hub_repo, folder_path=str(path), path_in_repo=path.name, run_as_future=True)
                pending_uploads.append(upload)
        if args.validation_steps and vqvae is not None and global_step % args.validation_steps == 0:
            if accelerator.is_main_process:
                log_validation(accelerator, model, vqvae, args, global_step)
    progress.close()

    # Every rank must end with the same weights and must have seen its own data: record both for inspection.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checksums = accelerator.gather(checksum[None].to(accelerator.device)).tolist()
    fingerprints = accelerator.gather(torch.tensor([first_batch_fingerprint], device=accelerator.device)).tolist()
    if accelerator.is_main_process:
        summary = {"global_step": global_step, "parameter_checksums": checksums, "first_batch_fingerprints": fingerprints}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if len(set(checksums)) != 1:
            logger.warning("Parameters differ across processes: %s", checksums)

    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(final.parameters())
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards: every process must call it
    if accelerator.is_main_process:
        final.save_pretrained(output_dir / "transformer", state_dict=state_dict)
        if vqvae is not None:
            from rar_hf.pipeline_rar import RARPipeline

            RARPipeline(transformer=final, vqvae=vqvae).save_pretrained(output_dir)
            from rar_hf.model_card import write_training_model_card

            write_training_model_card(output_dir, final.config, args, global_step, accelerator.num_processes)
        finish_uploads(pending_uploads)
        if hub_repo is not None:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=hub_repo,
                folder_path=str(output_dir),
                ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"],
                commit_message=f"Final model after {global_step} steps",
            )
    # Release the DDP wrapper while its process group is alive: freed at interpreter exit instead, its reducer joins
    # gloo's worker thread while holding the GIL that thread may need, which hung a 2-process CPU run once.
    del model
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
