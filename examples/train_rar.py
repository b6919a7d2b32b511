#!/usr/bin/env python
"""Train a RAR generator with 🤗 Accelerate.

One GPU or CPU:      accelerate launch examples/train_rar.py --pretokenized_dataset DIR --output_dir out
8 GPUs on one node:  accelerate launch --multi_gpu --num_processes 8 examples/train_rar.py ...
Several nodes:       accelerate launch --config_file examples/accelerate_configs/multi_node.yaml examples/train_rar.py ...

Data comes either pre-tokenised (`--pretokenized_dataset`: parquet / datasets folder / Hub id / official
`maskgitvq.jsonl`, see examples/pretokenize.py) or as images (`--dataset_name`, optionally `--streaming`) that the
frozen tokenizer given by `--vqvae` turns into tokens on each process's device. The defaults are the paper's recipe,
its warm-up and annealing in proportion to `--max_train_steps`. A small run on a folder of PNGs (one subfolder per
class) on a CPU: README.md, "Train your own in 5 minutes".

Fine-tuning: `--pretrained_model` (a pipeline, transformer, training run or checkpoint, or a Hub id) with data of
another class set (classes of the same name keep their embeddings, see `rar_hf.finetuning`), in full or, with
`--lora_rank`, as a LoRA adapter through PEFT: README.md, "Fine-tune a pretrained model to your classes".
"""

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_scheduler

import rar_hf
from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.arguments import ArgumentParser, run_script
from rar_hf.data import RARDataCollator
from rar_hf.finetuning import ADAPTER_RECORD, ADAPTER_WEIGHTS, DEFAULT_LORA_TARGETS, NEW_CLASS_INITS, adapter_parameters
from rar_hf.run_folder import RUN_RECORD, RUN_VQVAE, SUMMARY, folder_kind, pipeline_labels
from rar_hf.training_utils import (
    LOCK_NAME,
    LossWindow,
    UserInputError,
    check_distributed_launch,
    check_output_dir,
    checkpoint_step,
    describe_load_error,
    deterministic_algorithms,
    finish_uploads,
    load_checkpoint,
    load_pretrained,
    prepare_output_dir,
    register_adapter_checkpointing,
    save_adapter,
    resolve_checkpoint,
    save_checkpoint,
    setting_changes,
    truncate_metrics,
    vqvae_resolution,
)

logger = get_logger(__name__)
# The VQ model of the shipped tiny-digits pipeline (32-px images, 8x8 tokens): any image folder can train on it.
SHIPPED_VQVAE = Path(rar_hf.__file__).resolve().parent / "pretrained" / "tiny-digits" / "vqvae"


# The paper's schedule as fractions of the run: warm-up 62,500 and annealing 125,000 -> 187,500 of 250,000 steps.
PAPER_SCHEDULE = {"lr_warmup_steps": 0.25, "anneal_start": 0.5, "anneal_end": 0.75}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--pretokenized_dataset", default=None, help="Pre-tokenised data: folder, parquet glob, Hub id or official .jsonl.")
    data.add_argument("--dataset_name", default=None, help="Image dataset (Hub id, folder or parquet files) tokenised on the fly with --vqvae; a folder of data/train/<class>/*.png gives the classes their folder names.")
    data.add_argument("--dataset_split", default="train", help="Split to train on.")
    data.add_argument("--streaming", action="store_true", help="Stream --dataset_name instead of downloading it whole.")
    data.add_argument("--image_column", default="image", help="Image column of --dataset_name ('jpg' for timm/imagenet-1k-wds).")
    data.add_argument("--label_column", default="label", help="Label column ('cls' for timm/imagenet-1k-wds).")
    data.add_argument("--resolution", type=int, default=None, help="Image size for on-the-fly tokenising (ADM centre crop); default: the --vqvae model's sample_size, which it must match.")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips for on-the-fly tokenising.")
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer of streamed datasets.")
    data.add_argument("--vqvae", default=None, help="MaskGITVQModel folder or Hub id: tokenises images on the fly, is recorded in --output_dir/vqvae and saved with the final pipeline; default: the run's recorded one on resume, else the tokenizer that --pretokenized_dataset records (when it is on this machine with the same weights), else none (the run then writes a transformer only).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")

    model = p.add_argument_group("model")
    model.add_argument("--model_config", default="rar-b", help="A preset (rar-b, rar-l, rar-xl, rar-xxl) or a config.json path; sizes that come from the data (codebook, tokens, classes) may be left out of it; not with --pretrained_model.")
    model.add_argument("--pretrained_model", "--pretrained_model_name_or_path", dest="pretrained_model", default=None,
                       help="Fine-tune this model instead of training from scratch: a RARPipeline or RAR transformer folder, a training run or checkpoint of this script (EMA weights when it has them), or a Hub id; its VQ model is the default --vqvae, and the class set comes from the data (classes of the same name keep their embeddings); default: from scratch.")  # fmt: skip
    model.add_argument("--new_class_init", default="null", choices=NEW_CLASS_INITS, help="Fine-tuning: the embedding of a class the pretrained model does not have: the null class's ('null', a new class starts as the unconditional model), the mean of the pretrained classes' ('mean'), or a fresh random one ('random'); each but 'random' plus noise of the pretrained class embeddings' spread.")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    model.add_argument("--scan_order", default="raster", help="Final scan order the annealing converges to (raster, spiral_in, ...).")
    model.add_argument("--class_dropout_prob", type=float, default=0.1, help="Class-label dropout (trains the null class for guidance).")

    optim = p.add_argument_group("optimisation (defaults: the paper's recipe, its schedule in proportion to --max_train_steps)")
    optim.add_argument("--train_batch_size", type=int, default=2048, help="Batch size per process per micro-step (paper: 2048 in total).")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    optim.add_argument("--max_train_steps", type=int, default=250_000, help="Optimizer steps.")
    optim.add_argument("--learning_rate", type=float, default=4e-4, help="Peak learning rate.")
    optim.add_argument("--min_learning_rate", type=float, default=1e-5, help="Learning rate at the end of the cosine.")
    optim.add_argument("--lr_scheduler", default="cosine_with_min_lr", help="transformers scheduler name.")
    optim.add_argument("--lr_warmup_steps", type=int, default=None, help="Linear warm-up steps, at most --max_train_steps; default: 25%% of --max_train_steps (the paper: 62,500 of 250,000).")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, default=0.96, help="AdamW beta2.")
    optim.add_argument("--weight_decay", type=float, default=0.03, help="Weight decay (not on norms, biases, embeddings).")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping.")
    optim.add_argument("--anneal_start", type=int, default=None, help="Step where the random-order probability r starts to fall from 1, at most --max_train_steps; default: 50%% of --max_train_steps (the paper: 125,000 of 250,000).")
    optim.add_argument("--anneal_end", type=int, default=None, help="Step where r reaches 0 (pure scan order), at most --max_train_steps (--anneal_start = --anneal_end = --max_train_steps: random orders only); default: 75%% of --max_train_steps (the paper: 187,500 of 250,000).")
    optim.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Overrides accelerate's config; default: accelerate's config.")
    optim.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (diffusers EMAModel) and save it.")
    optim.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay.")
    optim.add_argument("--seed", type=int, default=0, help="Seed of weights, data order, permutations and dropout.")

    lora = p.add_argument_group("LoRA (with --pretrained_model; through PEFT)")
    lora.add_argument("--lora_rank", type=int, default=None, help="Train a LoRA adapter of this rank (and the class embeddings) instead of every weight; the run then saves the adapter only; default: full fine-tuning.")
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA's alpha (the update is scaled by alpha / rank); default: --lora_rank.")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on LoRA's input.")
    lora.add_argument("--lora_target_modules", nargs="+", default=list(DEFAULT_LORA_TARGETS), help="Names of the linear layers to adapt (a module matches when its name ends with one), or all-linear.")

    out = p.add_argument_group("outputs")
    out.add_argument("--output_dir", default="rar-output", help="Where checkpoints, metrics.jsonl and the final model go.")
    out.add_argument("--checkpointing_steps", type=int, default=5000, help="Save a resumable checkpoint every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints; default: all.")
    out.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder or 'latest'; default: start a new run.")
    out.add_argument("--allow_schedule_change", action="store_true", help="Resume although the schedule or optimisation settings differ from the checkpoint's (the new ones apply from the resumed step on).")
    out.add_argument("--overwrite_output_dir", action="store_true", help="Delete what --output_dir holds (another run) and start again.")
    out.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none.")
    out.add_argument("--logging_steps", type=int, default=50, help="Log every N steps (trackers and metrics.jsonl).")
    out.add_argument("--validation_steps", type=int, default=None, help="Log a sample grid every N steps (needs a VQ model); default: never.")
    out.add_argument("--validation_class_labels", type=int, nargs="+", default=[207, 360, 387, 974, 88, 979, 417, 279], help="Classes of the sample grid (modulo the class count).")
    out.add_argument("--push_to_hub", action="store_true", help="Upload checkpoints (in the background) and the final model.")
    out.add_argument("--hub_model_id", default=None, help="Hub repo for --push_to_hub; default: output_dir's name.")
    out.add_argument("--hub_private", action="store_true", help="Create the Hub repo as private.")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.pretokenized_dataset is None) == (args.dataset_name is None):
        p.error("give exactly one of --pretokenized_dataset and --dataset_name")
    if args.dataset_name is not None and args.vqvae is None and args.pretrained_model is None:
        p.error("--dataset_name needs --vqvae (or a --pretrained_model that has a VQ model) to tokenise images on the fly")
    if args.pretrained_model is not None and args.model_config != p.get_default("model_config"):
        p.error("--model_config with --pretrained_model: the architecture is the pretrained model's; leave --model_config out")
    if args.lora_rank is None:
        given = [f"--{k}" for k in ("lora_alpha", "lora_dropout", "lora_target_modules") if getattr(args, k) != p.get_default(k)]
        if given:
            p.error(f"{', '.join(given)} without --lora_rank: pass --lora_rank to train a LoRA adapter")
    else:
        if args.pretrained_model is None:
            p.error("--lora_rank adapts a pretrained model: pass --pretrained_model")
        if args.lora_rank < 1:
            p.error(f"--lora_rank must be at least 1, got {args.lora_rank}")
        if args.lora_target_modules == ["all-linear"]:
            args.lora_target_modules = "all-linear"
    return args


def resolve_schedule(args) -> None:
    """Warm-up and annealing steps in place: the paper's proportions of --max_train_steps where not given; a step
    past the end of the run is an error (the schedule would not run as asked)."""
    steps = args.max_train_steps
    if steps < 1:
        raise UserInputError(f"--max_train_steps must be at least 1, got {steps}.")
    for key, fraction in PAPER_SCHEDULE.items():
        if getattr(args, key) is None:
            setattr(args, key, int(fraction * steps))
    if not 0 <= args.lr_warmup_steps <= steps:
        raise UserInputError(
            f"--lr_warmup_steps {args.lr_warmup_steps} does not fit in the run (--max_train_steps {steps}): the learning "
            f"rate would never reach --learning_rate; pass --lr_warmup_steps between 0 and {steps}, or leave it out "
            f"(25% of the run: {int(0.25 * steps)})."
        )
    for key in ("anneal_start", "anneal_end"):
        value = getattr(args, key)
        if not 0 <= value <= steps:
            raise UserInputError(
                f"--{key} {value} does not fit in the run (--max_train_steps {steps}): the random-order annealing "
                f"would not happen as asked; pass --anneal_start/--anneal_end between 0 and {steps} (both {steps}: "
                f"random orders only), or leave them out (50% to 75% of the run: {int(0.5 * steps)} to {int(0.75 * steps)})."
            )
    if args.anneal_end < args.anneal_start:
        raise UserInputError(f"--anneal_end {args.anneal_end} is before --anneal_start {args.anneal_start}.")


def load_training_data(args):
    """The training split (map-style for pre-tokenised data) and what it says about the model it needs:
    `{"image_seq_len", "latent_size", "codebook_size", "class_names", "num_labels", "tokenizer"}` (None = unknown)."""
    from rar_hf.data import class_names, load_image_dataset, load_pretokenized_dataset, read_pretokenized_metadata

    info = dict.fromkeys(("image_seq_len", "latent_size", "codebook_size", "class_names", "num_labels", "tokenizer"))
    if args.pretokenized_dataset is None:
        try:
            dataset = load_image_dataset(args.dataset_name, split=args.dataset_split, streaming=args.streaming,
                                         image_column=args.image_column, label_column=args.label_column)  # fmt: skip
        except Exception as error:
            raise UserInputError(f"--dataset_name {args.dataset_name}: cannot load split {args.dataset_split!r} ({describe_load_error(error)}).") from error
        check_labels(dataset, f"--dataset_name {args.dataset_name}", args.label_column)
        info["class_names"] = class_names(dataset)
        if not args.streaming:
            info["num_labels"] = label_count(dataset, args.dataset_name)
        return dataset, info

    source = args.pretokenized_dataset
    try:
        metadata = read_pretokenized_metadata(source, args.dataset_split)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if metadata is not None:
        if not metadata.get("complete"):
            raise UserInputError(f"--pretokenized_dataset {source}: pretokenize.py has not finished writing it (re-run it to complete it).")
        made = metadata["fingerprint"]
        info.update({key: made.get(key) for key in ("image_seq_len", "latent_size", "codebook_size", "class_names", "tokenizer")})
    try:
        dataset = load_pretokenized_dataset(source, split=args.dataset_split)
    except Exception as error:
        raise UserInputError(f"--pretokenized_dataset {source}: {find_corrupted_file(source, error)}") from error
    check_labels(dataset, f"--pretokenized_dataset {source}", "label")
    info["class_names"] = info["class_names"] or class_names(dataset)
    info["num_labels"] = label_count(dataset, source)
    if len(dataset):
        seq_len = len(dataset[0]["tokens"])
        if info["image_seq_len"] is not None and seq_len != info["image_seq_len"]:
            raise UserInputError(f"--pretokenized_dataset {source}: rows hold {seq_len} tokens, its metadata says {info['image_seq_len']}.")
        info["image_seq_len"] = seq_len
    return dataset, info


def check_labels(dataset, source: str, column: str) -> None:
    """Class labels must be class ids: a `datasets.ClassLabel` (names and ids) or integers. Strings, floats or lists
    cannot be read as classes (nor mapped onto a pretrained model's classes by name)."""
    import datasets

    feature = (dataset.features or {}).get("label")
    if feature is None or isinstance(feature, datasets.ClassLabel):
        return
    dtype = getattr(feature, "dtype", type(feature).__name__)
    if not (isinstance(feature, datasets.Value) and ("int" in dtype)):
        raise UserInputError(
            f"{source}: the label column {column!r} holds {dtype} values, not class ids: make it a datasets.ClassLabel "
            "(names and ids; an image folder with one subfolder per class gives one) or integers 0..num_classes-1."
        )


def label_count(dataset, source) -> int:
    """1 + the largest label of a map-style dataset (read from the Arrow column, without decoding rows)."""
    import pyarrow.compute as pc

    if len(dataset) == 0:
        return 0
    bounds = pc.min_max(dataset.data.column("label")).as_py()
    if bounds["min"] < 0:
        raise UserInputError(f"{source}: negative class label {bounds['min']}; labels must be 0..num_classes-1.")
    return bounds["max"] + 1


def find_corrupted_file(source, error) -> str:
    """Name the data file behind a failed load when one of the local files cannot be read."""
    import glob as globbing
    import os

    import pyarrow.parquet as pq

    paths = globbing.glob(os.path.join(source, "**", "*.parquet"), recursive=True) if os.path.isdir(source) else globbing.glob(source)
    for path in sorted(paths):
        if path.endswith(".parquet"):
            try:
                pq.read_table(path)
            except Exception as bad:
                return f"{path} is corrupted or not a parquet file ({type(bad).__name__}: {str(bad)[:200]})."
    return f"cannot load it ({describe_load_error(error)})."


# Sizes that come from the data (tokenizer, resolution, classes) rather than from the architecture preset.
DATA_KEYS = ("codebook_size", "image_seq_len", "latent_size", "num_classes")


def data_overrides(args, vqvae, info) -> dict:
    overrides = {}
    if info["codebook_size"] is not None:
        overrides["codebook_size"] = info["codebook_size"]
    elif vqvae is not None:
        overrides["codebook_size"] = vqvae.config.codebook_size
    if vqvae is not None and info["codebook_size"] is not None and vqvae.config.codebook_size != info["codebook_size"]:
        raise UserInputError(
            f"--vqvae {args.vqvae} has {vqvae.config.codebook_size} codes but --pretokenized_dataset "
            f"{args.pretokenized_dataset} was made with a tokenizer of {info['codebook_size']}."
        )
    if info["image_seq_len"] is not None:  # pre-tokenised: the rows say it, --resolution plays no part
        overrides["image_seq_len"] = info["image_seq_len"]
        if info["latent_size"] is not None:
            overrides["latent_size"] = list(info["latent_size"])
        else:
            side = int(round(info["image_seq_len"] ** 0.5))
            overrides["latent_size"] = [side, side] if side * side == info["image_seq_len"] else None
    elif vqvae is not None:
        side = args.resolution // vqvae.downsample_factor
        overrides.update(latent_size=[side, side], image_seq_len=side * side)
    if info["class_names"] is not None:
        overrides["num_classes"] = len(info["class_names"])
    return {k: v for k, v in overrides.items() if v is not None}


def build_config(args, vqvae, info) -> RARConfig:
    overrides = data_overrides(args, vqvae, info)
    if Path(args.model_config).is_file():
        try:
            explicit = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
        except ValueError as error:
            raise UserInputError(f"--model_config {args.model_config}: not valid JSON ({error}).") from None
        for key, value in overrides.items():
            if key in explicit and explicit[key] != value:
                raise UserInputError(
                    f"--model_config {args.model_config} sets {key}={explicit[key]} but the training data has {value} "
                    f"({describe_data(args)}); remove {key} from the config or use matching data."
                )
        config = RARConfig.from_json_file(args.model_config)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.class_dropout_prob = args.class_dropout_prob
    else:
        config = RARConfig.from_preset(args.model_config, class_dropout_prob=args.class_dropout_prob, **overrides)
    if info["class_names"] is not None:
        config.id2label = dict(enumerate(info["class_names"]))
    return config


def describe_data(args) -> str:
    return f"--pretokenized_dataset {args.pretokenized_dataset}" if args.pretokenized_dataset else f"--dataset_name {args.dataset_name}"


def check_model_fits_data(args, config, vqvae, info) -> None:
    """Errors before the first step, with the counts, for data the model cannot take."""
    data = describe_data(args)
    for key, value in data_overrides(args, vqvae, info).items():
        have = list(config.latent_size) if key == "latent_size" else getattr(config, key)
        if key != "num_classes" and have != value:
            raise UserInputError(f"the model has {key}={have} but {data} has {key}={value}.")
    classes = len(info["class_names"]) if info["class_names"] is not None else info["num_labels"]
    if classes is not None and classes > config.num_classes:
        what = f"{classes} classes" if info["class_names"] is not None else f"labels up to {classes - 1}"
        raise UserInputError(f"{data} has {what} but the model has {config.num_classes} classes (0..{config.num_classes - 1}).")
    if info["tokenizer"] and vqvae is not None and "weights_sha256" in info["tokenizer"]:
        from rar_hf.data import tokenizer_fingerprint

        made_with = info["tokenizer"]
        if {k: made_with[k] for k in ("config_sha256", "weights_sha256")} != tokenizer_fingerprint(vqvae):
            raise UserInputError(
                f"--vqvae {args.vqvae} is not the tokenizer {data} was made with ({made_with.get('name_or_path')}): the "
                "saved pipeline would decode its tokens into the wrong images."
            )


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


def pretokenized_batches(args, dataset, accelerator, collator, batch_size, start_batch):
    """Yield collated batches of a map-style pre-tokenised dataset from global batch `start_batch` on, forever.

    Each epoch is a seeded DistributedSampler permutation; resuming skips batches in the sampler, so nothing is
    re-read and the collator (whose randomness depends on the batch index alone) replays the same batches.
    """
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
        raise UserInputError(
            f"--pretokenized_dataset {args.pretokenized_dataset} has {len(dataset)} rows: fewer than one batch of {batch_size} per process "
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


def image_batches(args, dataset, accelerator, collator, batch_size, start_batch, vqvae, skip_counter):
    """Yield collated batches of images tokenised on the fly by the frozen `vqvae`, from `start_batch` on.

    Resuming re-reads (but does not tokenise) the skipped batches, which keeps the seeded shuffle exact.
    """
    from rar_hf.data import ImageTransform, decode_images, split_and_shuffle

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
            raise UserInputError(f"--dataset_name {args.dataset_name} yields fewer than one batch of {batch_size} per process.")


# --- the VQ model: given, recorded by the run, or the one the pre-tokenised data was made with ---


def find_vqvae(args, output_dir: Path, info, resuming: bool, base=None):
    """`(vqvae, where it came from)` or `(None, None)`: --vqvae; else the run's recorded vqvae/ when resuming; else the
    VQ model of --pretrained_model (`base`); else the tokenizer that pretokenize.py recorded for the data, if it is on
    this machine with the same weights (the shipped tiny-digits VQ model is looked at too); else none. A --vqvae that
    is not the run's recorded one, or not the pretrained model's, is refused."""
    from rar_hf.data import tokenizer_fingerprint
    from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

    recorded = output_dir / RUN_VQVAE
    recorded = recorded if resuming and folder_kind(recorded) == "vqvae" else None
    base_vqvae = base.vqvae if base is not None else None
    if args.vqvae is not None:
        vqvae = load_pretrained(MaskGITVQModel, args.vqvae, "--vqvae")
        if recorded is not None and tokenizer_fingerprint(vqvae) != tokenizer_fingerprint(MaskGITVQModel.from_pretrained(recorded)):
            raise UserInputError(
                f"--vqvae {args.vqvae} is not the VQ model this run was trained with ({recorded}): leave --vqvae out "
                "to resume with the recorded one."
            )
        if base_vqvae is not None and tokenizer_fingerprint(vqvae) != tokenizer_fingerprint(base_vqvae):
            raise UserInputError(
                f"--vqvae {args.vqvae} is not the VQ model of --pretrained_model {args.pretrained_model}, whose tokens "
                "it learned: leave --vqvae out to use that one."
            )
        return vqvae, args.vqvae
    if recorded is not None:
        return MaskGITVQModel.from_pretrained(recorded), str(recorded)
    if base_vqvae is not None:
        logger.info("No --vqvae: using the VQ model of --pretrained_model %s.", args.pretrained_model, main_process_only=True)
        source = f"{base.source}/{RUN_VQVAE}"
        return base_vqvae, source
    made_with = info["tokenizer"] or {}
    if "weights_sha256" in made_with:
        wanted = {k: made_with[k] for k in ("config_sha256", "weights_sha256")}
        for candidate in (made_with.get("name_or_path"), str(SHIPPED_VQVAE)):
            if candidate and folder_kind(candidate) == "vqvae":
                vqvae = MaskGITVQModel.from_pretrained(candidate)
                if tokenizer_fingerprint(vqvae) == wanted:
                    logger.info("No --vqvae: using %s, the tokenizer %s was made with.", candidate, describe_data(args), main_process_only=True)
                    return vqvae, candidate
    logger.warning(
        "No --vqvae: the run writes a transformer without a VQ model, which cannot decode images; pass --vqvae to "
        "record one (or copy a MaskGITVQModel folder to %s).", output_dir / RUN_VQVAE, main_process_only=True,
    )
    return None, None


def resolve_resolution(args, vqvae, vqvae_source) -> None:
    """--resolution for on-the-fly tokenising: the VQ model's sample_size unless given, and never another one."""
    if args.dataset_name is None:
        return
    if vqvae is None:
        raise UserInputError(
            f"--dataset_name needs a VQ model to tokenise its images, and --pretrained_model {args.pretrained_model} "
            "has none: pass --vqvae (the one the pretrained model was trained with)."
        )
    args.resolution = vqvae_resolution(args.resolution, vqvae, vqvae_source)


def record_vqvae(vqvae, output_dir: Path) -> None:
    """Save the run's VQ model into output_dir/vqvae (once, atomically), so that its checkpoints can be sampled."""
    target = output_dir / RUN_VQVAE
    if vqvae is None or folder_kind(target) == "vqvae":
        return
    tmp = output_dir / f".{RUN_VQVAE}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    vqvae.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


# --- fine-tuning: the pretrained model, its classes and the adapter ---


def load_base(args):
    """--pretrained_model, with any failure as one line."""
    from rar_hf.run_folder import load_base_model

    try:
        return load_base_model(args.pretrained_model, "--pretrained_model")
    except UserInputError:
        raise
    except Exception as error:
        raise UserInputError(f"--pretrained_model {args.pretrained_model}: cannot load it ({describe_load_error(error)}).") from error


def fit_classes(args, base, info):
    """The pretrained model with the data's class set (`rar_hf.finetuning.adapt_classes`: rows of the classes of the
    same name kept, the others initialised by --new_class_init, the null class kept), and the record of where it
    came from: `{"source", "weights_sha256", "architecture", "num_classes", "class_sources", "new_class_init"}`.
    Data whose labels have no names keeps the pretrained classes (its labels are their ids)."""
    from rar_hf.finetuning import adapt_classes, architecture, describe_class_sources, match_classes
    from rar_hf.weights import weights_sha256

    model, old = base.transformer, base.id2label
    model.requires_grad_(True)  # a LoRA run merged into its base comes frozen
    model.config.class_dropout_prob = args.class_dropout_prob
    pretrained = {"source": base.source, "weights_sha256": weights_sha256(model), "architecture": architecture(model.config),
                  "num_classes": model.config.num_classes, "new_class_init": args.new_class_init}  # fmt: skip
    names = info["class_names"]
    if names is None:
        logger.info("The data's labels have no names: they are the ids of the %d classes of %s.", len(old), base.description, main_process_only=True)
        names, sources = [old[i] for i in range(len(old))], list(range(len(old)))
        model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    else:
        sources = match_classes(old, names)
        adapt_classes(model, names, sources, init=args.new_class_init, seed=args.seed)
        logger.info("Classes of %s: %s.", base.description, describe_class_sources(old, names, sources, args.new_class_init), main_process_only=True)
    return model, {**pretrained, "class_sources": sources}


def add_lora(args, model, pretrained, vqvae):
    """The model wrapped by PEFT for LoRA (`rar_hf.finetuning.lora_config`) and the adapter's record
    (rar_adapter.json)."""
    from peft import get_peft_model

    from rar_hf.finetuning import adapter_record, lora_config

    peft_config = lora_config(model.config, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    model.name_or_path = pretrained["source"]  # what PEFT records as base_model_name_or_path
    model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA rank %d: %d of %d parameters train (%.2f%%).", args.lora_rank, trainable, total, 100 * trainable / total, main_process_only=True)
    return model, adapter_record(pretrained, model.config, RUN_VQVAE if vqvae is not None else None)


# --- what a resume must find unchanged (or be told with --allow_schedule_change) ---

SCHEDULE_KEYS = (
    "max_train_steps", "lr_warmup_steps", "learning_rate", "min_learning_rate", "lr_scheduler", "anneal_start",
    "anneal_end", "scan_order", "class_dropout_prob", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm",
    "ema_decay", "train_batch_size", "gradient_accumulation_steps", "seed",
)  # fmt: skip


# What the trained weights are (their shapes and meaning): a resume never changes these.
ADAPTER_KEYS = ("lora_rank", "lora_alpha", "lora_target_modules")


def run_settings(args, num_processes: int) -> dict:
    settings = {key: getattr(args, key) for key in SCHEDULE_KEYS}
    if not args.use_ema:
        del settings["ema_decay"]
    settings = {**settings, "use_ema": args.use_ema, "num_processes": num_processes, "lora_rank": args.lora_rank}
    if args.lora_rank is not None:
        settings.update(lora_alpha=args.lora_alpha, lora_target_modules=args.lora_target_modules, lora_dropout=args.lora_dropout)
    return settings


def check_schedule(args, checkpoint: Path, settings: dict) -> list[dict]:
    """The schedule changes recorded so far, plus this resume's if it changes anything (which needs
    --allow_schedule_change); a refusal names every change. The LoRA shape settings never change."""
    record_path = checkpoint / RUN_RECORD
    if not record_path.is_file():
        logger.warning("%s records no settings (saved by an older version): the schedule cannot be checked.", checkpoint, main_process_only=True)
        return []
    record = json.loads(record_path.read_text(encoding="utf-8"))
    history = list(record.get("schedule_changes", []))
    saved = record["settings"]
    fixed = setting_changes({k: v for k, v in saved.items() if k in ADAPTER_KEYS}, settings)
    if fixed:
        raise UserInputError(
            f"resuming {checkpoint} would change what its weights are ({', '.join(fixed)}): resume with the run's "
            "settings, or start a new run."
        )
    changes = setting_changes(saved, settings)
    if not changes:
        return history
    if not args.allow_schedule_change:
        raise UserInputError(
            f"resuming {checkpoint} would change the run's settings ({', '.join(changes)}): pass "
            "--allow_schedule_change to continue with the new ones from this step on, or resume with the old ones."
        )
    logger.warning("Settings changed at step %d (--allow_schedule_change): %s.", checkpoint_step(checkpoint), ", ".join(changes), main_process_only=True)
    return history + [{"step": checkpoint_step(checkpoint), "changes": changes}]


def apply_settings(args, optimizer, lr_scheduler, ema) -> None:
    """Put the current settings into the state a checkpoint restored: the optimizer's param groups (learning rate,
    weight decay, betas), the scheduler's base rates, the EMA decay. Without a change they hold these already."""
    for group, decays in zip(optimizer.param_groups, (True, False)):
        group.update(initial_lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
        group["weight_decay"] = args.weight_decay if decays else 0.0
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if hasattr(scheduler, "lr_lambdas"):  # transformers' schedules are LambdaLRs, built from the current settings
        scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
        for group, rate in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = args.learning_rate * rate(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if ema is not None:
        ema.decay = args.ema_decay


def check_base(checkpoint: Path, pretrained: dict | None) -> None:
    """A resume must start from the base the run started from (its weights are rebuilt from it: all of them with
    LoRA, the shapes otherwise); runs recorded before this check are not checked."""
    record_path = checkpoint / RUN_RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    if "pretrained" not in record:
        return
    saved = record["pretrained"]
    if saved is None and pretrained is not None:
        raise UserInputError(f"{checkpoint} is from a run trained from scratch: leave --pretrained_model out to resume it.")
    if saved is not None and pretrained is None:
        raise UserInputError(f"{checkpoint} is from a run fine-tuned from {saved['source']}: pass --pretrained_model {saved['source']} to resume it.")
    if saved is not None and saved["weights_sha256"] != pretrained["weights_sha256"]:
        raise UserInputError(
            f"--pretrained_model {pretrained['source']} is not the model {checkpoint}'s run was fine-tuned from "
            f"({saved['source']}, other weights): pass that one to resume it."
        )


def checkpoint_writer(accelerator, model, run_record):
    """What each checkpoint holds beside accelerate's state, so that it can be sampled and resumed with checks:
    the model's config.json and generation_config.json (a LoRA run: rar_adapter.json, beside the adapter that
    register_adapter_checkpointing writes), and training_run.json (settings, schedule changes)."""

    def write(folder: Path) -> None:
        if run_record["adapter"] is not None:
            (folder / ADAPTER_RECORD).write_text(json.dumps(run_record["adapter"], indent=2), encoding="utf-8")
        else:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.config.save_pretrained(folder)
            unwrapped.generation_config.save_pretrained(folder)
        (folder / RUN_RECORD).write_text(json.dumps(run_record, indent=2), encoding="utf-8")

    return write


def final_outputs_current(output_dir: Path, step: int, vqvae, lora: bool) -> bool:
    """Whether output_dir holds the final model of `step` (and the pipeline, with a VQ model; a LoRA run: the
    adapter)."""
    try:
        summary = json.loads((output_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if lora:
        complete = (output_dir / ADAPTER_WEIGHTS).is_file() and (output_dir / ADAPTER_RECORD).is_file()
    else:
        complete = (output_dir / "transformer" / "model.safetensors").is_file()
        complete = complete and (vqvae is None or (output_dir / "model_index.json").is_file())
    return complete and summary.get("global_step") == step


def log_validation(accelerator, model, vqvae, args, step):
    from rar_hf.pipeline_rar import RARPipeline

    transformer = accelerator.unwrap_model(model)
    if args.lora_rank is not None:
        transformer = transformer.get_base_model()  # the model with the LoRA layers in it
    pipeline = RARPipeline(transformer=transformer, vqvae=vqvae, id2label=pipeline_labels(transformer.config))
    # The CPU fast paths swap the linear layers for packed copies during a call and back after it: new parameters,
    # which the optimizer and the EMA would no longer update.
    pipeline.disable_cpu_fast_paths()
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


def check_finetuning(args) -> None:
    """Mistakes in the fine-tuning flags, before anything is loaded or written: a --pretrained_model that is no
    model, LoRA targets that match no module of RAR (checked on an empty model: RAR's module names do not depend on
    its size)."""
    from rar_hf.finetuning import check_lora_targets
    from rar_hf.run_folder import check_base_source

    if args.pretrained_model is not None:
        check_base_source(args.pretrained_model, "--pretrained_model")
    if args.lora_rank is not None:
        with torch.device("meta"):
            empty = RARForImageGeneration(RARConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                                                    codebook_size=2, num_classes=1, image_seq_len=1))  # fmt: skip
        try:
            check_lora_targets(empty, args.lora_target_modules)
        except ValueError as error:
            raise UserInputError(f"--lora_target_modules: {error}") from None


def main(args):
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    check_finetuning(args)
    resolve_schedule(args)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_distributed_launch(accelerator.num_processes)
    if args.lora_rank is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise UserInputError("--lora_rank with FSDP: the adapter is saved from the main process's whole model; use DDP (an adapter's trainable weights are small).")
    settings = run_settings(args, accelerator.num_processes)
    schedule_changes = check_schedule(args, checkpoint, settings) if checkpoint is not None else []
    # Seeded CPU runs are bit-identical only with deterministic kernels (measured no slower here, see the README).
    deterministic = deterministic_algorithms() if accelerator.device.type == "cpu" else contextlib.nullcontext()
    with deterministic:
        train(args, accelerator, output_dir, checkpoint, settings, schedule_changes)


def train(args, accelerator, output_dir, checkpoint, settings, schedule_changes):
    set_seed(args.seed)
    run_lock = prepare_output_dir(accelerator, output_dir, args.overwrite_output_dir)  # noqa: F841 (held until exit)
    hub_repo, pending_uploads = None, []  # pending: background checkpoint uploads (futures)
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        hub_repo = create_repo(args.hub_model_id or output_dir.name, private=args.hub_private, exist_ok=True).repo_id

    dataset, data_info = load_training_data(args)
    base = load_base(args) if args.pretrained_model is not None else None
    vqvae, vqvae_source = find_vqvae(args, output_dir, data_info, resuming=checkpoint is not None, base=base)
    resolve_resolution(args, vqvae, vqvae_source)
    if vqvae is not None:
        vqvae = vqvae.to(accelerator.device).eval().requires_grad_(False)
    if base is not None:
        model, pretrained = fit_classes(args, base, data_info)
        del base
    else:
        model, pretrained = RARForImageGeneration(build_config(args, vqvae, data_info)), None
    check_model_fits_data(args, model.config, vqvae, data_info)
    if checkpoint is not None:
        check_base(checkpoint, pretrained)
    if accelerator.is_main_process:
        record_vqvae(vqvae, output_dir)
    if args.gradient_checkpointing:
        # activation_checkpointing_enable is the name since transformers 5.2x; gradient_checkpointing_enable before.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    adapter = None
    if args.lora_rank is not None:
        model, adapter = add_lora(args, model, pretrained, vqvae)
        register_adapter_checkpointing(accelerator)
    config = model.config
    # What the EMA averages: every weight, or with LoRA the adapter's (the base does not change).
    ema_parameters = adapter_parameters(model) if adapter is not None else list(model.parameters())
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(ema_parameters, decay=args.ema_decay, model_cls=RARForImageGeneration, model_config=config)

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
    loss_window = LossWindow(accelerator.device, accelerator.process_index)
    custom_states = {"loss_window": loss_window}  # saved as safetensors by save_checkpoint, never pickled
    if ema is not None:
        ema.to(accelerator.device)
        custom_states["ema"] = ema

    global_step = 0
    if checkpoint is not None:
        global_step = load_checkpoint(accelerator, checkpoint, custom_states, optional=("loss_window",))
        apply_settings(args, optimizer, lr_scheduler, ema)
        logger.info("Resumed from %s at step %d.", checkpoint, global_step)
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s: starting from scratch.", output_dir)
    # Where the VQ model came from: a Hub id, or (a path on this machine) the run's own copy.
    recorded_vqvae = None if vqvae is None else (vqvae_source if not os.path.exists(vqvae_source) else RUN_VQVAE)
    run_record = {"settings": settings, "schedule_changes": schedule_changes, "vqvae": recorded_vqvae,
                  "pretrained": pretrained, "adapter": adapter}  # fmt: skip
    write_checkpoint_extras = checkpoint_writer(accelerator, model, run_record)

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
        batches = pretokenized_batches(args, dataset, accelerator, collator, args.train_batch_size, start_batch)
    else:
        from rar_hf.data import SkipCounter

        skip_counter = SkipCounter()
        batches = image_batches(args, dataset, accelerator, collator, args.train_batch_size, start_batch, vqvae, skip_counter)

    if accelerator.is_main_process:
        accelerator.init_trackers("rar", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    metrics = MetricsWriter(output_dir / "metrics.jsonl", accelerator.is_main_process, global_step)
    tokens_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes * config.image_seq_len
    # A resume at the end writes the final model only when the folder lacks it (a run killed after its last
    # checkpoint); every process must agree, whatever disk each one sees.
    finished_before = global_step >= args.max_train_steps
    write_final = [not (finished_before and final_outputs_current(output_dir, global_step, vqvae, adapter is not None))]
    broadcast_object_list(write_final)
    if finished_before:
        done = "writing its final model to" if write_final[0] else "its final model is in"
        accelerator.print(f"run already at step {global_step} of {args.max_train_steps}; {done} {output_dir}")
    else:
        logger.info(
            "Training %.2fM parameters for %d steps, %d processes x %d samples x %d accumulation.",
            sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            args.max_train_steps,
            accelerator.num_processes,
            args.train_batch_size,
            args.gradient_accumulation_steps,
        )
    progress = tqdm(
        total=args.max_train_steps,
        initial=min(global_step, args.max_train_steps),
        desc="steps",
        disable=finished_before or not accelerator.is_local_main_process,
    )
    model.train()
    window_start, window_steps, first_batch_fingerprint = time.perf_counter(), 0, None
    while global_step < args.max_train_steps:
        batch = next(batches)
        if first_batch_fingerprint is None:
            first_batch_fingerprint = float((batch["input_ids"] * 31 + batch["orders"][:, :1]).double().sin().sum())
        ratio = float(batch.pop("randomness_ratio"))
        batch_step = int(batch.pop("step"))
        assert batch_step == global_step, f"collator step {batch_step} != optimizer step {global_step}"
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            # transformers' num_items_in_batch: the labelled tokens of the whole accumulated step (every micro-batch
            # holds the same count), times the steps accelerator.backward divides the loss by again.
            num_items = (batch["labels"] != -100).sum() * args.gradient_accumulation_steps
            # No KV cache in training: nothing reads it, and the config default (use_cache=True) would build one.
            loss = model(**batch, use_cache=False, num_items_in_batch=num_items).loss * args.gradient_accumulation_steps
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_window.add(loss)
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        window_steps += 1
        progress.update(1)
        if ema is not None:
            ema.step(ema_parameters)
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            mean_loss = loss_window.mean(accelerator)
            elapsed = time.perf_counter() - window_start
            record = {
                "step": global_step,
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "randomness_ratio": ratio,  # r of the batch of the step just completed: r(step - 1)
                "tokens_per_second": tokens_per_step * window_steps / elapsed,  # steps since the last log or resume
                "skipped_images": skip_counter.count if skip_counter is not None else 0,
            }
            accelerator.log(record, step=global_step)
            metrics.write(record)
            progress.set_postfix(loss=f"{mean_loss:.4f}", r=f"{ratio:.3f}")
            window_steps, window_start = 0, time.perf_counter()
        if global_step % args.checkpointing_steps == 0:
            # The rotation in save_checkpoint may delete a checkpoint that a background upload is still reading.
            finish_uploads(pending_uploads)
            loss_window.gather(accelerator)
            path = save_checkpoint(
                accelerator, output_dir, global_step, args.checkpoints_total_limit, custom_states, write_checkpoint_extras
            )
            if hub_repo is not None:
                from huggingface_hub import upload_folder

                upload = upload_folder(repo_id=hub_repo, folder_path=str(path), path_in_repo=path.name, run_as_future=True)
                pending_uploads.append(upload)
        if args.validation_steps and vqvae is not None and global_step % args.validation_steps == 0:
            if accelerator.is_main_process:
                log_validation(accelerator, model, vqvae, args, global_step)
    progress.close()

    if write_final[0]:
        save_final(accelerator, args, model, ema, ema_parameters, vqvae, run_record, global_step, first_batch_fingerprint, hub_repo, pending_uploads)
    # Release the DDP wrapper while its process group is alive: freed at interpreter exit instead, its reducer joins
    # gloo's worker thread while holding the GIL that thread may need, which hung a 2-process CPU run once.
    del model
    accelerator.free_memory()
    accelerator.end_training()


def save_final(accelerator, args, model, ema, ema_parameters, vqvae, run_record, global_step, first_batch_fingerprint, hub_repo, pending_uploads):
    """train_summary.json, the final transformer/ (the EMA weights with --use_ema) and, with a VQ model, the pipeline
    and its model card (a LoRA run: the adapter and its rar_adapter.json); then the Hub upload."""
    output_dir = Path(args.output_dir)
    # Every rank must end with the same weights and must have seen its own data: record both for inspection.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checksums = accelerator.gather(checksum[None].to(accelerator.device)).tolist()
    fingerprint = float("nan") if first_batch_fingerprint is None else first_batch_fingerprint  # nan: no step run
    fingerprints = accelerator.gather(torch.tensor([fingerprint], device=accelerator.device)).tolist()
    if accelerator.is_main_process:
        summary = {
            "global_step": global_step,
            "weights": "EMA weights" if ema is not None else "trained weights",
            "parameter_checksums": checksums,
            "first_batch_fingerprints": [None if math.isnan(f) else f for f in fingerprints],
            **run_record,
        }
        (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
        if len(set(checksums)) != 1:
            logger.warning("Parameters differ across processes: %s", checksums)

    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(ema_parameters)
    adapter = run_record["adapter"]
    # Gathers FSDP shards: every process must call it (LoRA runs refuse FSDP and save from the main process).
    state_dict = accelerator.get_state_dict(model) if adapter is None else None
    if accelerator.is_main_process and adapter is not None:
        save_adapter(final, output_dir)
        (output_dir / ADAPTER_RECORD).write_text(json.dumps(adapter, indent=2), encoding="utf-8")
    elif accelerator.is_main_process:
        final.save_pretrained(output_dir / "transformer", state_dict=state_dict)
        if vqvae is not None:
            from rar_hf.pipeline_rar import RARPipeline

            RARPipeline(transformer=final, vqvae=vqvae, id2label=pipeline_labels(final.config)).save_pretrained(output_dir)
            from rar_hf.model_card import write_training_model_card

            write_training_model_card(
                output_dir, final.config, args, global_step, accelerator.num_processes, run_record["schedule_changes"]
            )
    if accelerator.is_main_process:
        finish_uploads(pending_uploads)
        if hub_repo is not None:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=hub_repo,
                folder_path=str(output_dir),
                ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*", LOCK_NAME],
                commit_message=f"Final model after {global_step} steps",
            )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_script(main, parse_args())
