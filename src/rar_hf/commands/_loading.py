"""Model loading shared by the commands, with errors that name the file or flag at fault."""

from pathlib import Path

from ..arguments import HUB_OFFLINE_HINT, UserError

PIPELINE_FOLDER = "a RARPipeline folder (model_index.json, transformer/, vqvae/) or a Hub id"


def check_safetensors_files(folder: Path) -> None:
    """Open the header of every safetensors file in `folder`: a truncated or foreign file is named before loading."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # SafetensorError, OSError: both mean the file cannot be used
            raise UserError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error


def is_local_path(name: str) -> bool:
    """Whether a `--model`-like value means a local path (it exists, or cannot be a Hub id) rather than a Hub id."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_hub_id(flag: str, repo_id: str, *filenames: str) -> None:
    """With HF_HUB_OFFLINE=1, a Hub id must be in the local cache (one of `filenames`): say so before anything loads."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames):
        raise UserError(f"{flag} {repo_id}: not a local folder and not in the Hugging Face cache; {HUB_OFFLINE_HINT}")


def hub_load_error(flag: str, name: str, error: BaseException) -> UserError:
    """One line for a failed `from_pretrained(name)`: offline, no network, no such repo, or the root cause."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return UserError(f"{flag} {name}: not a local folder and not in the Hugging Face cache; {HUB_OFFLINE_HINT}")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return UserError(f"{flag} {name}: no such local folder or Hugging Face Hub repo")
    network = [e for e in chain if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__]
    if network:
        return UserError(
            f"{flag} {name}: not in the Hugging Face cache and the Hub cannot be reached ({network[-1]}); "
            "pass a local folder or check the network"
        )
    root = chain[-1]
    return UserError(f"{flag} {name}: could not load it: {type(root).__name__}: {' '.join(str(root).split())}")


def local_folder(flag: str, value: str, expected: str) -> Path:
    """`value` as a folder that exists, or a `UserError` saying what it is instead (a file, nothing)."""
    path = Path(value)
    if path.is_file():
        raise UserError(f"{flag} {value} is a file; expected {expected}")
    if not path.is_dir():
        raise UserError(f"{flag} {value}: no such folder; expected {expected}")
    return path


def resolve_model(model: str) -> str:
    """A local pipeline folder, or a Hub id that can be loaded (in the cache when HF_HUB_OFFLINE=1)."""
    if is_local_path(model):
        path = local_folder("--model", model, PIPELINE_FOLDER)
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model}: not a RARPipeline folder (no model_index.json)")
        check_safetensors_files(path)
        return str(path)
    check_hub_id("--model", model, "model_index.json")
    return model


def load_pipeline(model: str, **kwargs):
    """`RARPipeline.from_pretrained` with one-line errors for a missing, corrupted or unreachable model."""
    from ..pipeline_rar import RARPipeline
    from ..run_folder import is_run_folder, load_run_pipeline

    if is_run_folder(model):  # a training run or checkpoint that is not a pipeline (yet)
        pipeline, description = load_run_pipeline(model, dtype=kwargs.get("dtype"))
        print(description)
        return pipeline
    source = resolve_model(model)
    try:
        return RARPipeline.from_pretrained(source, **kwargs)
    except OSError as error:
        # huggingface_hub's errors for a missing repo or no network are OSErrors that do not repeat the id.
        raise hub_load_error("--model", model, error) from error


def load_transformer(value: str, flag: str, **kwargs):
    """A `RARForImageGeneration` from a transformer folder, the `transformer/` of a pipeline folder, or a Hub id."""
    from ..modeling_rar import RARForImageGeneration

    expected = "a RARForImageGeneration folder (config.json), a RARPipeline folder or a Hub id"
    if is_local_path(value):
        path = local_folder(flag, value, expected)
        if not (path / "config.json").is_file() and (path / "model_index.json").is_file():
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {value}: no config.json; expected {expected}")
        check_safetensors_files(path)
        source = str(path)
    else:
        check_hub_id(flag, value, "config.json", "transformer/config.json")
        source = value
    try:
        return RARForImageGeneration.from_pretrained(source, **kwargs)
    except OSError as error:
        if source == value and not is_local_path(value):  # a pipeline repo: its transformer/ subfolder
            try:
                return RARForImageGeneration.from_pretrained(value, subfolder="transformer", **kwargs)
            except OSError:
                pass
        raise hub_load_error(flag, value, error) from error
