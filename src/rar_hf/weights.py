"""Reading weight files that someone else wrote, and fingerprinting weights.

Every state dict the package reads from a file of unknown origin (official RAR / MaskGIT-VQGAN checkpoints, the FID
Inception weights) goes through `load_state_dict_file`: `.safetensors` with safetensors, anything else with
`torch.load(weights_only=True)`, so that nothing in a file can run code; a file that is neither (a text file, a
truncated download, a pickle of something else) is one clear `ValueError` naming it.
"""

import hashlib
import warnings
from pathlib import Path

import torch

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # the legacy torch.save format (a pickle, protocol >= 2)


def _looks_like_safetensors(head: bytes) -> bool:
    # 8 bytes of little-endian header length, then the JSON header.
    return len(head) > 8 and head[8:9] == b"{"


def _describe_foreign(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"its first bytes are {head[:8]!r}"
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        shown = " ".join(text.split())[:40]
        return f"it is a text file (it starts with {shown!r})"
    return f"its first bytes are {head[:8]!r}"


def _torch_load_error(error: BaseException) -> str:
    # torch's weights-only refusal is a page of advice (including a suggestion to retry with the full unpickler, which
    # would run the file's code); keep the line that says what was refused.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        details = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
        return "the weights-only loader refused it: " + " ".join(details or ["unsupported content"])
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def torch_load_weights_only(path, safe_globals=()):
    """`torch.load(path, weights_only=True)` on CPU (plus the allow-listed `safe_globals`), with torch's page of
    advice on a refusal (or a pickle-protocol warning for a foreign file) turned into a one-line `ValueError`."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(safe_globals)):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: {_torch_load_error(error)}") from error


def load_state_dict_file(path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a state dict (name -> tensor) from a `.safetensors` file or a PyTorch `.bin`/`.pth`/`.pt` file.

    Args:
        path: the file.
        what: what the file should be, for the messages (e.g. "official RAR checkpoint").

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, a text file, a truncated or corrupted file, a pickle that the weights-only loader
            refuses (it would run code), or a file that does not hold a state dict of tensors.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected the {what} (a .safetensors, .bin or .pth file)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(64)
    readable = f"{path} is not a readable {what}"
    expected = "expected a PyTorch (.bin, .pth) or safetensors state dict"
    if not head:
        raise ValueError(f"{readable}: the file is empty; {expected}")
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path))
        except Exception as error:  # SafetensorError for a truncated or foreign file
            raise ValueError(f"{readable}: {type(error).__name__}: {error}") from error
    elif head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        try:
            state_dict = torch_load_weights_only(path)
        except ValueError as error:
            reason = str(error).removeprefix(f"{path}: ")
            raise ValueError(f"{readable} (truncated, corrupted or not weights only): {reason}") from error
    else:
        raise ValueError(f"{readable}: {_describe_foreign(head)}; {expected}")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state_dict).__name__}); expected the {what}")
    return state_dict


def weights_sha256(module: torch.nn.Module) -> str:
    """A hash of every tensor (name, dtype, shape, bytes) of `module`: the same weights wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

