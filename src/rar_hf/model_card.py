"""Hub model cards (README.md with YAML metadata) for RAR pipeline folders, and what `RARPipeline.save_pretrained`
does after diffusers has saved the components.

The templates are package data in `rar_hf/model_cards/`: one per official size (`rar-b.md`, `rar-l.md`, `rar-xl.md`,
`rar-xxl.md`, with the paper's FID/IS as `model-index` metadata) and `rar-generic.md` for every other model. Cards go
through diffusers' model-card utilities (`load_or_create_model_card`, `populate_model_card`). A card that rar-hf wrote
carries `GENERATED_MARKER` and is rewritten on every save; a README.md without it is the user's: its text is kept and
only its metadata is completed.
"""

import json
import logging
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from string import Template

import torch
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import ModelCard

from .configuration_rar import match_preset

logger = logging.getLogger(__name__)

GENERATED_MARKER = "<!-- rar-hf model card:"
CARD_TAGS = ["image-generation", "autoregressive", "class-conditional", "rar", "rar-hf"]
VALIDATION_GRID = "validation.png"
# Written by from_pretrained into component configs: where the weights were loaded from on the machine that saved.
_LOCAL_CONFIG_KEYS = ("_name_or_path",)


def model_card_template_name(config, training=None) -> str:
    """`"rar-b"` ... `"rar-xxl"` for the official ImageNet weights of that size, else `"rar-generic"`.

    A model gets an official card (and the paper's metrics) only if it has the official size and token layout and no
    `training` record, i.e. it is a converted official checkpoint rather than a model trained or fine-tuned here.
    """
    preset = match_preset(config.to_dict())
    imagenet_256 = (config.codebook_size, config.num_classes, config.image_seq_len) == (1024, 1000, 256)
    return preset if preset and imagenet_256 and training is None else "rar-generic"


def _num_parameters(config) -> str:
    from .modeling_rar import RARForImageGeneration

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        count = sum(p.numel() for p in RARForImageGeneration(config).parameters())
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def _training_markdown(training) -> str:
    if not training:
        return "Not recorded for this checkpoint."
    if isinstance(training, str):
        return training
    return "\n".join(f"- **{key}**: {value}" for key, value in training.items())


def is_generated_card(path) -> bool:
    """Whether the README.md at `path` is a card that rar-hf wrote (and may rewrite), not the user's own."""
    return GENERATED_MARKER in Path(path).read_text(encoding="utf-8", errors="replace")


def _complete_metadata(card: ModelCard, training=None, base_model: str | None = None) -> ModelCard:
    data = card.data
    if data.license is None:
        data.license = "apache-2.0"
    if data.pipeline_tag is None:
        data.pipeline_tag = "unconditional-image-generation"
    card = populate_model_card(card, tags=[tag for tag in CARD_TAGS if tag not in (data.tags or [])])
    if isinstance(training, dict) and training.get("dataset"):
        card.data.datasets = [training["dataset"]]
    if base_model:
        card.data.base_model = base_model
    return card


def write_model_card(
    output_dir,
    config,
    repo_id: str | None = None,
    training: dict | str | None = None,
    base_model: str | None = None,
    validation_grid=None,
    generation_config=None,
) -> Path:
    r"""
    Write `README.md` (Hub model card) into a pipeline folder.

    Args:
        output_dir (`str` or `os.PathLike`): the pipeline folder.
        config ([`RARConfig`]): the generator's config; picks the template (see [`model_card_template_name`]) and fills
            the architecture.
        generation_config (`GenerationConfig`, *optional*): the generator's sampling defaults (its
            `generation_config`), shown as the recommended settings; by default those a model built from `config`
            starts with.
        repo_id (`str`, *optional*): the Hub repo the folder goes to, used in the usage snippet; defaults to
            `path/to/<folder name>`.
        training (`dict` or `str`, *optional*): how the model was trained (e.g. `{"dataset": "ylecun/mnist",
            "steps": 2000, "batch_size": 64}`), rendered in the "Training" section; a `"dataset"` entry also becomes
            the card's `datasets` metadata. Official checkpoints have none.
        base_model (`str`, *optional*): the Hub id of the model this one was fine-tuned from (`base_model` metadata).
        validation_grid (`str` or `os.PathLike`, *optional*): an image of samples, copied into the folder as
            `validation.png` and shown in the "Training" section.

    A `README.md` already in `output_dir` that rar-hf did not write is never replaced: its text is kept and only its
    metadata (license, library, tags, datasets, base model) is completed.

    Returns:
        `Path` of the written `README.md`.

    Example:

    ```py
    >>> write_model_card("rar-xl", pipe.transformer.config, repo_id="org/rar-xl")
    ```
    """
    output_dir = Path(output_dir)
    path = output_dir / "README.md"
    if path.is_file() and not is_generated_card(path):
        card = _complete_metadata(load_or_create_model_card(str(path)), training, base_model)
        card.save(path)
        logger.warning("Kept the existing %s (it was not written by rar-hf); only its metadata was completed.", path)
        return path
    training_text = _training_markdown(training)
    if validation_grid is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        if Path(validation_grid).resolve() != (output_dir / VALIDATION_GRID).resolve():
            shutil.copyfile(validation_grid, output_dir / VALIDATION_GRID)
        training_text += f"\n\nSamples at the end of training:\n\n![validation samples]({VALIDATION_GRID})"
    name = model_card_template_name(config, training)
    template = resources.files("rar_hf").joinpath("model_cards", f"{name}.md").read_text(encoding="utf-8")
    if generation_config is None:
        from .generation_rar import RARGenerationMixin

        generation_config = RARGenerationMixin.default_generation_config(config)
    height, width = config.latent_size
    text = Template(template).substitute(
        repo_id=repo_id or f"path/to/{output_dir.resolve().name}",
        model_name=(repo_id or output_dir.resolve().name).split("/")[-1],
        guidance_scale=generation_config.guidance_scale,
        guidance_scale_pow=getattr(generation_config, "guidance_scale_pow", 0.0),
        temperature=generation_config.temperature,
        num_parameters=_num_parameters(config),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        num_classes=config.num_classes,
        image_seq_len=config.image_seq_len,
        latent_height=height,
        latent_width=width,
        codebook_size=config.codebook_size,
        training=training_text,
    )
    card = ModelCard(text)  # parses the YAML front matter: a broken template fails here, not on the Hub
    card = _complete_metadata(card, training, base_model)
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def strip_local_paths(folder) -> None:
    """Drop `_name_or_path` (a path on the machine that saved) from the configs of a saved pipeline."""
    for config_path in [Path(folder) / "model_index.json", *Path(folder).glob("*/config.json")]:
        if not config_path.is_file():
            continue
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if any(key in config for key in _LOCAL_CONFIG_KEYS):
            for key in _LOCAL_CONFIG_KEYS:
                config.pop(key, None)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def finish_saved_pipeline(
    pipeline,
    save_directory,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> None:
    """What `RARPipeline.save_pretrained` adds to diffusers': no local paths in the configs, our model card, the push.

    diffusers' own push would overwrite the card with a generic one, so the push happens here (same arguments).
    """
    save_directory = Path(save_directory)
    strip_local_paths(save_directory)
    if push_to_hub:
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id or save_directory.resolve().name, exist_ok=True, private=private, token=token).repo_id
    transformer = pipeline.transformer
    write_model_card(save_directory, transformer.config, repo_id=repo_id, generation_config=transformer.generation_config)
    if push_to_hub:
        pipeline._upload_folder(
            str(save_directory), repo_id, token=token, commit_message=commit_message, create_pr=create_pr
        )


def _hub_id(value: str | None) -> str | None:
    # Only Hub ids go into the metadata: a local folder or file pattern is a path on the training machine.
    if value and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value) and not os.path.exists(value):
        return value
    return None


def describe_annealing(anneal_start: int, anneal_end: int, steps: int, scan_order: str) -> str:
    """The random-order schedule that a run of `steps` optimizer steps trained with, in words."""
    if anneal_start >= steps:
        return f"r = 1 throughout (random orders only; the final {scan_order} order was never trained alone)"
    if anneal_end == 0:
        return f"r = 0 throughout ({scan_order} order only)"
    if anneal_start == anneal_end:
        return f"r = 1 until step {anneal_start}, then 0 ({scan_order} order)"
    return f"r = 1 until step {anneal_start}, then linearly to 0 at step {anneal_end} (final order: {scan_order})"


def describe_learning_rate(args) -> str:
    rate = f"{args.learning_rate} after {args.lr_warmup_steps} warm-up steps, then {args.lr_scheduler}"
    if "min_lr" in args.lr_scheduler:
        rate += f" to {args.min_learning_rate} at step {args.max_train_steps}"
    return rate


def write_training_model_card(output_dir, config, args, global_step: int, num_processes: int = 1, schedule_changes=()) -> Path:
    """The card at the end of examples/train_rar.py: data, steps, batch, the learning-rate and annealing schedules
    that ran (`args` holds the resolved steps; `schedule_changes`: `[{"step", "changes"}]` of resumes that changed
    them), final loss, the last sample grid."""
    output_dir = Path(output_dir)
    final_loss = None
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines:
            final_loss = json.loads(lines[-1]).get("loss")
    dataset = args.dataset_name or args.pretokenized_dataset
    batch = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    training = {
        # A local folder is a path on the training machine, not a dataset anyone else can look up.
        "dataset": _hub_id(dataset),
        "data": f"pre-tokenised ({Path(dataset).name})" if args.pretokenized_dataset else Path(str(dataset)).name,
        "steps": global_step,
        "batch size": f"{batch} ({args.train_batch_size} per process x {args.gradient_accumulation_steps} "
        f"accumulation steps x {num_processes} processes)",
        "learning rate": describe_learning_rate(args),
        "random-order annealing": describe_annealing(args.anneal_start, args.anneal_end, args.max_train_steps, args.scan_order),
        "schedule changes": "; ".join(f"at step {c['step']}: {', '.join(c['changes'])}" for c in schedule_changes) or None,
        "final loss": f"{final_loss:.4f}" if final_loss is not None else "not logged",
    }
    training = {key: value for key, value in training.items() if value is not None}
    grids = sorted((output_dir / "samples").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    pretrained = getattr(args, "pretrained_model", None)
    base_model = _hub_id(pretrained)
    return write_model_card(
        output_dir,
        config,
        repo_id=getattr(args, "hub_model_id", None),
        training=training,
        base_model=base_model,
        validation_grid=grids[-1] if grids else None,
    )
