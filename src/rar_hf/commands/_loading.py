"""Argument types and pipeline loading shared by the commands, with errors that name the file or flag at fault."""

import argparse
import math
from pathlib import Path

from ..cli import UserError


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (NaN guidance would silently give black images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_safetensors_files(folder: Path) -> None:
    """Open the header of every safetensors file in `folder`: a truncated or foreign file is named before loading."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # SafetensorError, OSError: both mean the file cannot be used
            raise UserError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error


def resolve_model(model: str) -> str:
    """A local pipeline folder, or a Hub id that can be loaded (in the cache when HF_HUB_OFFLINE=1)."""
    path = Path(model)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        if not path.is_dir():
            raise UserError(f"--model {model}: no such pipeline folder")
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model}: not a RARPipeline folder (no model_index.json)")
        check_safetensors_files(path)
        return str(path)
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        raise UserError(
            f"--model {model}: not a local folder, and HF_HUB_OFFLINE=1 forbids downloading it from the Hub "
            "(it is not in the Hub cache); unset HF_HUB_OFFLINE or pass a local pipeline folder"
        )
    return model


def load_pipeline(model: str, **kwargs):
    """`RARPipeline.from_pretrained` with one-line errors for a missing, corrupted or unreachable model."""
    from ..pipeline_rar import RARPipeline

    source = resolve_model(model)
    try:
        return RARPipeline.from_pretrained(source, **kwargs)
    except OSError as error:
        # huggingface_hub's errors for a missing repo or no network are OSErrors that do not repeat the id.
        raise UserError(f"--model {model}: could not load the pipeline: {error}") from error
