#!/usr/bin/env python
# coding=utf-8
"""Train a MaskGIT-VQGAN image tokenizer (`rar_hf.modeling_maskgit_vqgan.MaskGITVQModel`) with 🤗 Accelerate.

The objective is pixel reconstruction (MSE, optionally plus L1) and the VQ-VAE quantiser loss. There is
no GAN or perceptual loss: this script is meant for small tokenizers on small images (e.g. the tiny
digits default model), where MSE is enough to keep digits recognisable and a discriminator would cost
more CPU time than it is worth. Codes that are never picked are re-initialised from encoder outputs
(`--codebook_restart_steps`), which matters on small datasets where most of a fresh codebook dies.

Example (the tiny digits tokenizer: about 3 minutes on 2 CPU cores)::

    python -m rar_hf.data.digits --output_dir data/digits --image_size 32
    python examples/train_vqgan.py --dataset_name data/digits --resolution 32 \
        --model_config examples/tiny_digits/vqgan_config.json --max_train_steps 500 \
        --learning_rate 1e-3 --lr_warmup_steps 20 --validation_split test \
        --output_dir outputs/tiny-digits/vqgan
"""

import json
import logging
import math
import os

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from rar_hf.arguments import ArgumentParser, run_script
from rar_hf.data import ImageTransform, load_image_dataset
from rar_hf.data.datasets import open_image_or_raise
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.training_utils import (
    UserInputError,
    check_distributed_launch,
    check_output_dir,
    describe_load_error,
    load_checkpoint,
    load_pretrained,
    prepare_output_dir,
    resolve_checkpoint,
    save_checkpoint,
    truncate_metrics,
)

logger = get_logger(__name__, log_level="INFO")


def parse_args(input_args=None):
    parser = ArgumentParser(description="Train a MaskGIT-VQGAN image tokenizer.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model_config",
        type=str,
        help=(
            "MaskGITVQModel config for a model trained from scratch: a JSON file (e.g. a saved config.json) or an "
            "inline JSON object of constructor arguments. `sample_size` defaults to --resolution."
        ),
    )
    model.add_argument(
        "--pretrained_model",
        type=str,
        help="Folder or Hub id of a saved MaskGITVQModel to fine-tune.",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        required=True,
        help=(
            "Hub dataset id, local folder (parquet shards, image folder or save_to_disk folder) or .parquet file of "
            "the training images, as accepted by rar_hf.data.load_image_dataset."
        ),
    )
    parser.add_argument(
        "--dataset_config_name", type=str, default=None, help="Config of the Hub dataset, if it has several."
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where to cache downloaded/converted datasets.")
    parser.add_argument("--image_column", type=str, default="image", help="Dataset column holding the images.")
    parser.add_argument(
        "--label_column",
        type=str,
        default="label",
        help="Dataset column holding the class labels (required by load_image_dataset; unused by the tokenizer).",
    )
    parser.add_argument("--train_split", type=str, default="train", help="Split to train on.")
    parser.add_argument(
        "--validation_split",
        type=str,
        default=None,
        help="Held-out split; if given, its reconstruction MSE is measured at the end and written to eval.json.",
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Truncate the training set to this many (shuffled) images, for debugging or quick runs.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="Images are centre-cropped and resized to this square size; must be a multiple of the downsampling.",
    )
    parser.add_argument(
        "--random_flip",
        action="store_true",
        help="Randomly mirror training images horizontally (leave off for data that is not mirror-symmetric, "
        "such as digits).",
    )
    parser.add_argument("--output_dir", type=str, default="vqgan-model", help="Where checkpoints and the model go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, data order and restarts.")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Batch size per device.")
    parser.add_argument(
        "--max_train_steps", type=int, default=1000, help="Number of optimizer steps to train for."
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of batches to accumulate before an optimizer step.",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (after warmup).")
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help=(
            'Scheduler type: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or '
            '"constant_with_warmup".'
        ),
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear warmup steps of the scheduler.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.99, help="AdamW beta2.")
    parser.add_argument(
        "--adam_weight_decay",
        type=float,
        default=0.0,
        help="AdamW weight decay. Off by default: decay pulls rarely used codebook vectors towards zero.",
    )
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument(
        "--l1_weight",
        type=float,
        default=0.0,
        help="Weight of an extra L1 reconstruction term added to the MSE (sharper edges); 0 disables it.",
    )
    parser.add_argument(
        "--quantizer_weight", type=float, default=1.0, help="Weight of the codebook + commitment loss."
    )
    parser.add_argument(
        "--codebook_restart_steps",
        type=int,
        default=100,
        help=(
            "Every this many steps, codes that were not picked since the last restart are re-initialised to random "
            "encoder outputs of the current batch; 0 disables restarts."
        ),
    )
    parser.add_argument(
        "--use_ema", action="store_true", help="Keep an exponential moving average of the weights and save it."
    )
    parser.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the EMA weights.")
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes (0 decodes in the main process).",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the `accelerate config` value.",
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Tracker for the logs: "tensorboard", "wandb", "comet_ml", "all", or "none".',
    )
    parser.add_argument(
        "--logging_dir",
        type=str,
        default="logs",
        help="Tracker log folder, relative to --output_dir.",
    )
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log window means to the trackers and output_dir/metrics.jsonl every this many steps.",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the training state (for --resume_from_checkpoint) to output_dir/checkpoint-N every N steps.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints, deleting the oldest.",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder, or "latest" for the newest one in --output_dir (a fresh run if none).',
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Delete what --output_dir holds (another run) and start again; without it a non-empty folder is refused.",
    )

    args = parser.parse_args(input_args)
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.checkpointing_steps < 1:
        parser.error("--checkpointing_steps must be positive")
    if args.codebook_restart_steps < 0:
        parser.error("--codebook_restart_steps must be >= 0")
    return args


def load_model_config(value):
    """A config dict from a JSON file or an inline JSON object."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    try:
        config = json.loads(value)
    except json.JSONDecodeError:
        raise UserInputError(f"--model_config must be a JSON file or an inline JSON object, got {value!r}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"--model_config must be a JSON object, got {value!r}")
    return config


class CodebookUsage:
    """Code selection counts, summed over processes: per logging window, and since the last restart.

    Registered for checkpointing so that a resumed run restarts exactly the codes the interrupted one would.
    """

    def __init__(self, codebook_size):
        self.window = torch.zeros(codebook_size, dtype=torch.long)
        self.since_restart = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, counts):
        self.window += counts
        self.since_restart += counts

    def window_stats(self):
        """Fraction of codes used in the window and the perplexity of the code distribution."""
        total = self.window.sum()
        if total == 0:
            return 0.0, 0.0
        probs = self.window.double() / total
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        return (self.window > 0).float().mean().item(), entropy.exp().item()

    def state_dict(self):
        return {"window": self.window, "since_restart": self.since_restart}

    def load_state_dict(self, state):
        self.window.copy_(state["window"])
        self.since_restart.copy_(state["since_restart"])


@torch.no_grad()
def restart_dead_codes(accelerator, model, images, usage, generator, ema_model=None):
    """Re-initialise the codes unused since the last restart to random encoder outputs of this batch.

    Every process gathers the same latents and draws from an identically seeded generator, so the codebooks
    stay identical without a broadcast. Returns how many codes were restarted.
    """
    dead = (usage.since_restart == 0).nonzero().flatten()
    usage.since_restart.zero_()
    if dead.numel() == 0:
        return 0
    unwrapped = accelerator.unwrap_model(model)
    latents = unwrapped.encoder(images)
    latents = accelerator.gather(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float())
    if latents.shape[0] >= dead.numel():
        picks = torch.randperm(latents.shape[0], generator=generator)[: dead.numel()]
    else:
        picks = torch.randint(latents.shape[0], (dead.numel(),), generator=generator)
    weight = unwrapped.quantize.embedding.weight
    weight[dead.to(weight.device)] = latents[picks.to(latents.device)].to(weight.dtype)
    if ema_model is not None:
        # Restarted codes would otherwise be dragged back towards their dead values by the average.
        index = next(i for i, p in enumerate(unwrapped.parameters()) if p is weight)
        shadow = ema_model.shadow_params[index]
        shadow[dead.to(shadow.device)] = weight[dead.to(weight.device)].to(shadow.device, shadow.dtype)
    return dead.numel()


def make_dataloader(args, split, transform, shuffle, max_samples=None):
    try:
        dataset = load_image_dataset(
            args.dataset_name,
            split=split,
            image_column=args.image_column,
            label_column=args.label_column,
            cache_dir=args.cache_dir,
            **({"name": args.dataset_config_name} if args.dataset_config_name else {}),
        )
    except Exception as error:
        raise UserInputError(f"--dataset_name {args.dataset_name}: cannot load split {split!r} ({describe_load_error(error)}).") from error
    if max_samples is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(max_samples, len(dataset))))
    # Map-style with an on-the-fly transform (as the diffusers examples do): exact epochs, a seedable
    # shuffle and batch skipping on resume. load_image_dataset leaves images undecoded; decode them here, where a
    # corrupted file stops the run naming it (a map-style batch cannot just drop a row).
    where = f"an image of {args.dataset_name} ({split})"

    def preprocess(batch):
        try:
            return {"pixel_values": [transform(open_image_or_raise(image, where)) for image in batch["image"]]}
        except ValueError as error:
            raise UserInputError(str(error)) from None

    dataset = dataset.with_transform(preprocess)

    def collate_fn(examples):
        return torch.stack([example["pixel_values"] for example in examples])

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    return dataset, loader


@torch.no_grad()
def evaluate(model, dataloader, codebook_size):
    """Reconstruction MSE of the clamped eval-mode output, and codebook usage over the split."""
    model.eval()
    squared_error, pixels = 0.0, 0
    counts = torch.zeros(codebook_size, dtype=torch.long)
    for images in dataloader:
        images = images.to(model.device)
        output = model(images)
        squared_error += F.mse_loss(output.sample.float(), images.float(), reduction="sum").item()
        pixels += images.numel()
        counts += torch.bincount(output.indices.flatten().cpu(), minlength=codebook_size)
    usage = CodebookUsage(codebook_size)
    usage.update(counts)
    codebook_usage, perplexity = usage.window_stats()
    return {"mse": squared_error / pixels, "codebook_usage": codebook_usage, "perplexity": perplexity}


def main(args):
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # A seeded sampler, reseeded per epoch, makes the data order a function of (seed, epoch): a resumed
        # run sees the same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()

    set_seed(args.seed)
    check_distributed_launch(accelerator.num_processes)
    run_lock = prepare_output_dir(accelerator, args.output_dir, args.overwrite_output_dir)  # noqa: F841 (held until exit)

    if args.pretrained_model is not None:
        model = load_pretrained(MaskGITVQModel, args.pretrained_model, "--pretrained_model")
    else:
        config = load_model_config(args.model_config)
        config.setdefault("sample_size", args.resolution)
        model = MaskGITVQModel.from_config(config)
    model.train()
    codebook_size = model.config.codebook_size

    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_decay)

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    train_transform = ImageTransform(args.resolution, args.random_flip, seed=args.seed + accelerator.process_index)
    with accelerator.main_process_first():
        train_dataset, train_dataloader = make_dataloader(
            args, args.train_split, train_transform, shuffle=True, max_samples=args.max_train_samples
        )
        # Loaded now so that a missing split fails before training rather than after it.
        if args.validation_split is not None:
            eval_transform = ImageTransform(args.resolution, random_flip=False)
            eval_dataset, eval_dataloader = make_dataloader(args, args.validation_split, eval_transform, shuffle=False)

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # The prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    usage = CodebookUsage(codebook_size)
    # Saved as safetensors by save_checkpoint (accelerate's register_for_checkpointing would pickle them).
    custom_states = {"codebook_usage": usage}
    if ema_model is not None:
        ema_model.to(accelerator.device)
        custom_states["ema"] = ema_model

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        # TensorBoard's hparams only take scalars and strings.
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("train_vqgan", config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num epochs = {num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Parameters = {sum(p.numel() for p in model.parameters()):,}")

    global_step = 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint is not None and checkpoint is None:
        logger.info(f"No checkpoint in {args.output_dir}; starting a new training run.")
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}")
        global_step = load_checkpoint(accelerator, checkpoint, custom_states)
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, global_step)
    first_epoch = global_step // num_update_steps_per_epoch
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    window = {}  # sums of per-batch loss terms over the logging window
    window_batches = 0
    restarted_codes = 0
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        dataloader = train_dataloader
        if epoch == first_epoch and resume_batches > 0:
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        dataloader.set_epoch(epoch)
        for images in dataloader:
            with accelerator.accumulate(model):
                output = model(images)
                sample = output.sample.float()
                recon_loss = F.mse_loss(sample, images.float())
                loss = recon_loss + args.quantizer_weight * output.quantizer_loss
                terms = {
                    "recon_mse": recon_loss,
                    "quantizer_loss": output.quantizer_loss,
                    "codebook_loss": output.codebook_loss,
                    "commitment_loss": output.commitment_loss,
                }
                if args.l1_weight > 0:
                    terms["recon_l1"] = F.l1_loss(sample, images.float())
                    loss = loss + args.l1_weight * terms["recon_l1"]
                terms["loss"] = loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            for name, value in terms.items():
                window[name] = window.get(name, 0.0) + value.detach().float()
            window_batches += 1
            counts = torch.bincount(output.indices.flatten(), minlength=codebook_size)
            usage.update(accelerator.reduce(counts, reduction="sum").cpu())

            if not accelerator.sync_gradients:
                continue
            if ema_model is not None:
                ema_model.step(model.parameters())
            global_step += 1
            progress_bar.update(1)

            if args.codebook_restart_steps and global_step % args.codebook_restart_steps == 0:
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
                restarted_codes += restart_dead_codes(accelerator, model, images, usage, generator, ema_model)

            if global_step % args.logging_steps == 0:
                means = accelerator.reduce(torch.stack(list(window.values())) / window_batches, reduction="mean")
                logs = {name: value.item() for name, value in zip(window, means)}
                logs["codebook_usage"], logs["perplexity"] = usage.window_stats()
                logs["restarted_codes"] = restarted_codes
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(
                    loss=f"{logs['loss']:.4f}", usage=f"{logs['codebook_usage']:.2f}", lr=f"{logs['lr']:.2e}"
                )
                if accelerator.is_main_process:
                    with open(metrics_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"step": global_step, "epoch": epoch, **logs}) + "\n")
                window, window_batches, restarted_codes = {}, 0, 0
                usage.window.zero_()

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, custom_states)

            if global_step >= args.max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if ema_model is not None:
        ema_model.copy_to(model.parameters())
    if accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
        logger.info(f"Saved the tokenizer to {args.output_dir}")
        if args.validation_split is not None:
            results = {
                "split": args.validation_split,
                "num_images": len(eval_dataset),
                "step": global_step,
                **evaluate(model, eval_dataloader, codebook_size),
            }
            with open(os.path.join(args.output_dir, "eval.json"), "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=2)
            eval_logs = {f"eval/{name}": results[name] for name in ("mse", "codebook_usage", "perplexity")}
            accelerator.log(eval_logs, step=global_step)
            print(f"held-out ({args.validation_split}) reconstruction: {json.dumps(results)}")
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args())
