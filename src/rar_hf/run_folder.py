"""What the folders of rar-hf hold, and sampling from a training run that is not (yet) a pipeline.

`examples/train_rar.py --output_dir run` writes:

    run/vqvae/              the VQ model the run was trained with (--vqvae, or the tokenizer of pre-tokenised data),
                            recorded when the run starts
    run/checkpoint-N/       resumable state (accelerate) plus config.json, generation_config.json and
                            training_run.json; ema.safetensors with --use_ema
    run/transformer/, run/model_index.json, run/README.md, run/train_summary.json     at the end

and with `--lora_rank` (a LoRA fine-tune, see `rar_hf.finetuning`) the adapter instead of the model:

    run/checkpoint-N/       adapter_config.json, adapter_model.safetensors, rar_adapter.json (no model.safetensors)
    run/adapter_config.json, run/adapter_model.safetensors, run/rar_adapter.json, run/train_summary.json   at the end

A finished run with a VQ model is a `RARPipeline` folder. `load_run_pipeline` turns the other cases into a pipeline:
a checkpoint (with its EMA weights when it has them), a run killed before its end (its newest checkpoint), a
finished transformer-only run and a LoRA run (its base, given the adapter and merged), each paired with the run's
recorded `vqvae/`. `load_base_model` reads what `train_rar.py --pretrained_model` starts from.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .arguments import HUB_OFFLINE_HINT, UserError
from .finetuning import ADAPTER_CONFIG, ADAPTER_RECORD, ADAPTER_WEIGHTS

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
    "vqvae" (a MaskGITVQModel folder), "checkpoint" (a train_rar.py `checkpoint-N`), "adapter" (a PEFT adapter
    folder, e.g. a finished LoRA run), "run" (a train_rar.py output folder that is not a pipeline yet), "model"
    (another model's config.json) or "other"."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    if (path / "model_index.json").is_file():
        return "pipeline"
    if CHECKPOINT_PATTERN.match(path.name) and any((path / name).is_file() for name in ("model.safetensors", ADAPTER_WEIGHTS)):
        return "checkpoint"
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
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
        "adapter": "is a LoRA adapter (PEFT)",
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




def looks_like_hub_id(name: str) -> bool:
    """Whether a name that is no local path could be a Hub repo id (`org/name` or `name`)."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not name.endswith("/")


def class_names(config, names: dict | None = None) -> dict[int, str]:
    """The class names a model's pipeline uses: `names` (a pipeline's id2label) when given, else those of its config,
    else the pipeline's defaults (ImageNet's for 1000 classes, the ids as strings otherwise)."""
    if names:
        return {int(k): str(v) for k, v in names.items()}
    named = pipeline_labels(config)
    if named is not None:
        return named
    if config.num_classes == 1000:
        from .pipeline_rar import _imagenet_id2label

        return _imagenet_id2label()
    return {i: str(i) for i in range(config.num_classes)}


def _apply_ema(parameters: list, ema_path: Path) -> None:
    """Copy the EMA shadow weights of a checkpoint's ema.safetensors (diffusers' EMAModel, in parameter order) onto
    `parameters`."""
    from safetensors import safe_open

    with safe_open(str(ema_path), framework="pt") as f:
        shadow = sorted((k for k in f.keys() if k.startswith("shadow_params.")), key=lambda k: int(k.split(".")[1]))
        if len(shadow) != len(parameters):
            raise UserError(f"{ema_path}: {len(shadow)} EMA tensors for a model of {len(parameters)} parameters")
        for parameter, key in zip(parameters, shadow):
            value = f.get_tensor(key)
            if value.shape != parameter.shape:
                raise UserError(f"{ema_path}: {key} has shape {tuple(value.shape)}, the model {tuple(parameter.shape)}")
            parameter.data.copy_(value)


def load_checkpoint_transformer(checkpoint, dtype=None):
    """The `RARForImageGeneration` of a train_rar.py checkpoint, with its EMA weights when it has them (a LoRA
    checkpoint: its base with the adapter merged).

    Returns `(model, "EMA weights" | "trained weights")`.
    """
    from .modeling_rar import RARForImageGeneration

    checkpoint = Path(checkpoint)
    weights = "EMA weights" if (checkpoint / "ema.safetensors").is_file() else "trained weights"
    if (checkpoint / ADAPTER_WEIGHTS).is_file():
        model, _ = load_adapted_transformer(checkpoint, dtype=dtype)
        return model, weights
    if not (checkpoint / "config.json").is_file():
        raise UserError(
            f"{checkpoint}: the checkpoint holds no config.json (written by an older rar-hf); sample from the run's "
            "final folder instead"
        )
    model = RARForImageGeneration.from_pretrained(checkpoint, dtype=dtype)
    if weights == "EMA weights":
        _apply_ema(list(model.parameters()), checkpoint / "ema.safetensors")
    return model.eval(), weights


def _run_of(path: Path) -> tuple[Path, Path | None]:
    """(the run folder, the checkpoint to load or None for the final transformer/ or adapter)."""
    if folder_kind(path) == "checkpoint":
        return path.parent, path
    found = list_checkpoints(path)
    has_final = (path / "transformer" / "config.json").is_file() or (path / ADAPTER_WEIGHTS).is_file()
    summary = _read_json(path / SUMMARY) or {}
    final_step = summary.get("global_step") if has_final else None
    if found and (final_step is None or checkpoint_step(found[-1]) > final_step):
        return path, found[-1]
    if not has_final:
        raise UserError(f"{path}: a training run's folder without a checkpoint or a final transformer/ yet")
    return path, None


def checkpoint_step(checkpoint) -> int:
    """The optimizer step a `checkpoint-N` folder was saved at."""
    match = CHECKPOINT_PATTERN.match(Path(checkpoint).name)
    if match is None:
        raise UserError(f"{checkpoint} is not a complete checkpoint folder (expected a name like checkpoint-1000).")
    return int(match.group(1))


def is_run_folder(path) -> bool:
    """Whether `load_run_pipeline` is what loads `path` (a training run, checkpoint or LoRA adapter that is not a
    pipeline)."""
    return folder_kind(path) in ("run", "checkpoint", "adapter")


def load_run_transformer(path, dtype=None):
    """The transformer of a train_rar.py folder that is not a pipeline (see the module docstring): `(model, what was
    loaded, the run folder)`."""
    from .modeling_rar import RARForImageGeneration

    path = Path(path)
    run, checkpoint = _run_of(path)
    if checkpoint is not None:
        transformer, weights = load_checkpoint_transformer(checkpoint, dtype=dtype)
        return transformer, f"{checkpoint} (step {checkpoint_step(checkpoint)}, {weights})", run
    summary = _read_json(run / SUMMARY) or {}
    weights = summary.get("weights", "final weights")
    if (run / ADAPTER_WEIGHTS).is_file():
        transformer, base = load_adapted_transformer(run, dtype=dtype)
        return transformer, f"{run} (LoRA adapter, final, step {summary.get('global_step')}, {weights}, on {base.source})", run
    transformer = RARForImageGeneration.from_pretrained(run / "transformer", dtype=dtype).eval()
    return transformer, f"{run / 'transformer'} (final, step {summary.get('global_step')}, {weights})", run


def load_run_pipeline(path, dtype=None):
    """A `RARPipeline` from a train_rar.py folder that is not a pipeline (see the module docstring).

    Returns `(pipeline, description)`: the description says which weights (final, or a checkpoint's EMA or trained
    weights, at which step) and which VQ model were loaded.
    """
    from .modeling_maskgit_vqgan import MaskGITVQModel
    from .pipeline_rar import RARPipeline

    path = Path(path)
    run, _ = _run_of(path)
    vqvae_dir = run / RUN_VQVAE
    if folder_kind(vqvae_dir) != "vqvae":
        raise UserError(
            f"{path}: the run recorded no VQ model ({vqvae_dir} is missing), so its tokens cannot be decoded into "
            f"images: train with --vqvae <MaskGITVQModel folder>, or copy one to {vqvae_dir}"
        )
    transformer, what, _ = load_run_transformer(path, dtype=dtype)
    vqvae = MaskGITVQModel.from_pretrained(vqvae_dir)
    if dtype is not None:
        vqvae = vqvae.to(dtype)
    pipeline = RARPipeline(transformer=transformer, vqvae=vqvae.eval(), id2label=pipeline_labels(transformer.config))
    return pipeline, f"model: {what} with the VQ model {vqvae_dir}"


# ------------------------------------------------------------------------------------------------ fine-tuning


@dataclass
class BaseModel:
    """A pretrained model to fine-tune (`load_base_model`)."""

    transformer: object  # RARForImageGeneration
    id2label: dict  # its classes' names (those its pipeline uses)
    vqvae: object | None  # its VQ model (MaskGITVQModel) when its folder or repo has one
    source: str  # an absolute path, or the Hub id
    description: str


def load_base_model(name_or_path, what: str = "--pretrained_model", dtype=None) -> BaseModel:
    """The RAR model (and its VQ model and class names) that `name_or_path` holds: a pipeline folder, a transformer
    folder (its pipeline's or run's VQ model with it), a train_rar.py run or checkpoint (EMA weights when it has
    them; a LoRA run or checkpoint: its base with the adapter merged) or a Hub id (a pipeline or transformer repo).
    A folder of another kind is a `UserError` saying what it is; loading errors propagate."""
    from .modeling_maskgit_vqgan import MaskGITVQModel
    from .modeling_rar import RARForImageGeneration

    name = str(name_or_path)
    path = Path(name).expanduser()
    kind = check_base_source(name, what)
    names, vqvae_dir, vqvae = None, None, None
    if kind == "pipeline":
        transformer = RARForImageGeneration.from_pretrained(path / "transformer", dtype=dtype)
        names = (_read_json(path / "model_index.json") or {}).get("id2label")
        vqvae_dir, description = path / RUN_VQVAE, f"the pipeline {path}"
    elif kind == "transformer":
        transformer = RARForImageGeneration.from_pretrained(path, dtype=dtype)
        if folder_kind(path.parent) == "pipeline":
            names = (_read_json(path.parent / "model_index.json") or {}).get("id2label")
        if folder_kind(path.parent / RUN_VQVAE) == "vqvae":
            vqvae_dir = path.parent / RUN_VQVAE
        description = f"the transformer {path}"
    elif kind in ("run", "checkpoint", "adapter"):
        transformer, description, run = load_run_transformer(path, dtype=dtype)
        if folder_kind(run / RUN_VQVAE) == "vqvae":
            vqvae_dir = run / RUN_VQVAE
    else:  # a Hub id
        index = _hub_json(name, "model_index.json")
        subfolder = "transformer" if index is not None else ""
        transformer = RARForImageGeneration.from_pretrained(name, subfolder=subfolder, dtype=dtype)
        if index is not None:
            names = index.get("id2label")
            vqvae = MaskGITVQModel.from_pretrained(name, subfolder=RUN_VQVAE)
        return BaseModel(transformer, class_names(transformer.config, names), vqvae, name, f"the Hub model {name}")
    if vqvae_dir is not None:
        vqvae = MaskGITVQModel.from_pretrained(vqvae_dir)
    return BaseModel(transformer, class_names(transformer.config, names), vqvae, str(path.resolve()), description)


def check_base_source(name_or_path, what: str = "--pretrained_model") -> str:
    """The kind of folder (`folder_kind`) a model to fine-tune is, or "hub" for a Hub id; a `UserError` naming what
    it is otherwise (missing, a VQ model, another model, a Hub id that is not cached while offline)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    kind = folder_kind(path)
    if kind in ("pipeline", "transformer", "run", "checkpoint"):
        return kind
    if kind == "adapter":
        if not (path / ADAPTER_RECORD).is_file():
            raise UserError(f"{what} {name} is a PEFT adapter without {ADAPTER_RECORD}: merge it into its base first.")
        return kind
    if kind == "missing" and looks_like_hub_id(name):
        from huggingface_hub import constants, try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(name, f), str) for f in ("model_index.json", "config.json"))
        if constants.HF_HUB_OFFLINE and not cached:
            raise UserError(f"{what} {name}: no such folder, and as a Hub id it is not in the local Hugging Face cache; {HUB_OFFLINE_HINT}.")
        return "hub"
    if kind == "missing":
        raise UserError(f"{what} {name}: no such folder; pass a RARPipeline or RAR transformer folder, a training run or checkpoint, or a Hub id.")
    raise UserError(f"{what} {name} {describe_folder(path)}: pass a RARPipeline or RAR transformer folder, a training run or checkpoint, or a Hub id.")


def _hub_json(repo_id: str, filename: str) -> dict | None:
    """A JSON file of a Hub repo, or None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return _read_json(Path(hf_hub_download(repo_id, filename)))
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # offline, and this file is not cached: the repo's other file is
            return None
        raise


def load_adapted_transformer(folder, base=None, dtype=None, merge: bool = True):
    """A train_rar.py LoRA adapter (a run, a checkpoint or a copy of its adapter files) on its base: the base its
    `rar_adapter.json` records, or `base` (a folder or Hub id as `load_base_model` takes); checked against the
    record, given the adapter's class set, the adapter applied (with a checkpoint's EMA weights when it has them)
    and, with `merge`, merged into plain layers (`merge_and_unload`). Returns `(model, the BaseModel)`."""
    from .finetuning import adapter_parameters, load_adapter, read_adapter_record

    folder = Path(folder)
    record = read_adapter_record(folder)
    source = str(base) if base is not None else record["base_model"]
    loaded = load_base_model(source, what=f"the base model of {folder}", dtype=dtype)
    ema_path = folder / "ema.safetensors"
    model = load_adapter(loaded.transformer, folder, base_name=source, is_trainable=ema_path.is_file())
    if ema_path.is_file():
        _apply_ema(adapter_parameters(model), ema_path)
    model = model.merge_and_unload() if merge else model
    return model.eval(), loaded


def load_lora_pipeline(adapter, base=None, merge: bool = True, dtype=None):
    """A `RARPipeline` from a LoRA adapter that examples/train_rar.py wrote (the run folder, one of its checkpoints
    or a copy of the adapter files), on the base its record names or on `base`; with the adapter's class names, the
    run's VQ model (else the base's) and, with `merge` (the default), the adapter merged into plain `nn.Linear`
    layers: the speed of the base model. `merge=False` keeps PEFT's LoRA layers (the pipeline's transformer is
    then the PEFT model's base model with the adapter injected) and turns the CPU fast paths off for this pipeline:
    their packed layers cannot sit inside LoRA layers."""
    from .modeling_maskgit_vqgan import MaskGITVQModel
    from .pipeline_rar import RARPipeline

    folder = Path(adapter)
    model, loaded = load_adapted_transformer(folder, base=base, dtype=dtype, merge=merge)
    transformer = model if merge else model.get_base_model()
    run = folder.parent if folder_kind(folder) == "checkpoint" else folder
    vqvae = MaskGITVQModel.from_pretrained(run / RUN_VQVAE) if folder_kind(run / RUN_VQVAE) == "vqvae" else loaded.vqvae
    if vqvae is None:
        raise UserError(f"{folder}: neither the run nor its base {loaded.source} has a VQ model: copy a MaskGITVQModel folder to {run / RUN_VQVAE}")
    if dtype is not None:
        vqvae = vqvae.to(dtype)
    pipeline = RARPipeline(transformer=transformer, vqvae=vqvae.eval(), id2label=pipeline_labels(transformer.config))
    if not merge:
        pipeline.disable_cpu_fast_paths()
    return pipeline
