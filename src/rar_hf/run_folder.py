"""What the folders of rar-hf hold, and sampling from a training run that is not (yet) a pipeline.

`examples/train_rar.py --output_dir run` writes:

    run/vqvae/              the VQ model the run was trained with (--vqvae, or the tokenizer of pre-tokenised data),
                            recorded when the run starts
    run/checkpoint-N/       resumable state (accelerate) plus config.json, generation_config.json and
                            training_run.json; ema.safetensors with --use_ema
    run/transformer/, run/model_index.json, run/README.md, run/train_summary.json     at the end

A finished run with a VQ model is a `RARPipeline` folder. `load_run_pipeline` turns the other cases into a pipeline:
a checkpoint (with its EMA weights when it has them), a run killed before its end (its newest checkpoint) and a
finished transformer-only run, each paired with the run's recorded `vqvae/`.
"""

import json
import re
from pathlib import Path

from .arguments import UserError

RUN_VQVAE = "vqvae"
RUN_RECORD = "training_run.json"  # in each checkpoint: the settings of the run (see examples/train_rar.py)
SUMMARY = "train_summary.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def list_checkpoints(output_dir) -> list[Path]:
    """Complete `checkpoint-N` folders, oldest first (a save in progress is a hidden `.checkpoint-N.tmp`)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(d.name))]
    return [d for _, d in sorted(found)]


def folder_kind(path) -> str:
    """What `path` is: "missing", "file", "pipeline" (model_index.json), "transformer" (a RAR model folder),
    "vqvae" (a MaskGITVQModel folder), "checkpoint" (a train_rar.py `checkpoint-N`), "run" (a train_rar.py output
    folder that is not a pipeline yet), "model" (another model's config.json) or "other"."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    if (path / "model_index.json").is_file():
        return "pipeline"
    if CHECKPOINT_PATTERN.match(path.name) and (path / "model.safetensors").is_file():
        return "checkpoint"
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if config is not None:
        if config.get("model_type") == "rar":
            return "transformer"
        if config.get("_class_name") == "MaskGITVQModel":
            return "vqvae"
        return "model"
    if (path / "transformer" / "config.json").is_file() or any(CHECKPOINT_PATTERN.match(p.name) for p in path.iterdir()):
        return "run"
    return "other"


def describe_folder(path) -> str:
    """A few words on what a folder is, for error messages ("a RAR transformer folder", ...)."""
    return {
        "missing": "does not exist",
        "file": "is a file, not a folder",
        "pipeline": "is a RARPipeline folder",
        "transformer": "is a RAR transformer folder (RARForImageGeneration)",
        "vqvae": "is a VQ model folder (MaskGITVQModel)",
        "checkpoint": "is a training checkpoint",
        "run": "is a training run's folder",
        "model": "holds another kind of model (its config.json is neither a RAR nor a MaskGITVQModel config)",
        "other": "holds no model (no config.json or model_index.json)",
    }[folder_kind(path)]


def pipeline_labels(config) -> dict | None:
    """The class names a trained model's config carries (train_rar.py sets them from the data), for the pipeline;
    None (the pipeline's default names) when the config has only transformers' LABEL_k placeholders."""
    names = {int(k): v for k, v in (config.id2label or {}).items()}
    if set(names) != set(range(config.num_classes)) or all(v == f"LABEL_{k}" for k, v in names.items()):
        return None
    return names


def load_checkpoint_transformer(checkpoint, dtype=None):
    """The `RARForImageGeneration` of a train_rar.py checkpoint, with its EMA weights when it has them.

    Returns `(model, "EMA weights" | "trained weights")`.
    """
    from safetensors import safe_open

    from .modeling_rar import RARForImageGeneration

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise UserError(
            f"{checkpoint}: the checkpoint holds no config.json (written by an older rar-hf); sample from the run's "
            "final folder instead"
        )
    model = RARForImageGeneration.from_pretrained(checkpoint, dtype=dtype)
    ema_path = checkpoint / "ema.safetensors"
    if not ema_path.is_file():
        return model.eval(), "trained weights"
    parameters = list(model.parameters())
    with safe_open(str(ema_path), framework="pt") as f:
        shadow = sorted((k for k in f.keys() if k.startswith("shadow_params.")), key=lambda k: int(k.split(".")[1]))
        if len(shadow) != len(parameters):
            raise UserError(f"{ema_path}: {len(shadow)} EMA tensors for a model of {len(parameters)} parameters")
        for parameter, key in zip(parameters, shadow):
            value = f.get_tensor(key)
            if value.shape != parameter.shape:
                raise UserError(f"{ema_path}: {key} has shape {tuple(value.shape)}, the model {tuple(parameter.shape)}")
            parameter.data.copy_(value)
    return model.eval(), "EMA weights"


def _run_of(path: Path) -> tuple[Path, Path | None]:
    """(the run folder, the checkpoint to load or None for the final transformer/)."""
    if folder_kind(path) == "checkpoint":
        return path.parent, path
    found = list_checkpoints(path)
    summary = _read_json(path / SUMMARY) or {}
    final_step = summary.get("global_step") if (path / "transformer" / "config.json").is_file() else None
    if found and (final_step is None or checkpoint_number(found[-1]) > final_step):
        return path, found[-1]
    if final_step is None:
        raise UserError(f"{path}: a training run's folder without a checkpoint or a final transformer/ yet")
    return path, None


def checkpoint_number(checkpoint: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def is_run_folder(path) -> bool:
    """Whether `load_run_pipeline` is what loads `path` (a training run or checkpoint that is not a pipeline)."""
    return folder_kind(path) in ("run", "checkpoint")


def load_run_pipeline(path, dtype=None):
    """A `RARPipeline` from a train_rar.py folder that is not a pipeline (see the module docstring).

    Returns `(pipeline, description)`: the description says which weights (final, or a checkpoint's EMA or trained
    weights, at which step) and which VQ model were loaded.
    """
    from .modeling_maskgit_vqgan import MaskGITVQModel
    from .modeling_rar import RARForImageGeneration
    from .pipeline_rar import RARPipeline

    path = Path(path)
    run, checkpoint = _run_of(path)
    vqvae_dir = run / RUN_VQVAE
    if folder_kind(vqvae_dir) != "vqvae":
        raise UserError(
            f"{path}: the run recorded no VQ model ({vqvae_dir} is missing), so its tokens cannot be decoded into "
            f"images: train with --vqvae <MaskGITVQModel folder>, or copy one to {vqvae_dir}"
        )
    if checkpoint is not None:
        transformer, weights = load_checkpoint_transformer(checkpoint, dtype=dtype)
        what = f"{checkpoint} (step {checkpoint_number(checkpoint)}, {weights})"
    else:
        transformer = RARForImageGeneration.from_pretrained(run / "transformer", dtype=dtype).eval()
        summary = _read_json(run / SUMMARY) or {}
        weights = summary.get("weights", "final weights")
        what = f"{run / 'transformer'} (final, step {summary.get('global_step')}, {weights})"
    vqvae = MaskGITVQModel.from_pretrained(vqvae_dir)
    if dtype is not None:
        vqvae = vqvae.to(dtype)
    pipeline = RARPipeline(transformer=transformer, vqvae=vqvae.eval(), id2label=pipeline_labels(transformer.config))
    return pipeline, f"model: {what} with the VQ model {vqvae_dir}"
