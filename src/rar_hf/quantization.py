r"""Quantized inference: torchao weights through transformers' `TorchAoConfig`, checked before loading, measured in
real bytes.

RAR models quantize the transformers way (`pip install "rar-hf[quantization]"` installs torchao):

```py
from transformers import TorchAoConfig
from torchao.quantization import Int8WeightOnlyConfig
from rar_hf import RARForImageGeneration, RARPipeline

model = RARForImageGeneration.from_pretrained(path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))

# a pipeline: diffusers' per-component mapping (the transformers config quantizes the transformers component)
from diffusers import PipelineQuantizationConfig

pipe = RARPipeline.from_pretrained(
    path, quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
)
```

The names `rar-hf generate --quantize` takes (and [`torchao_config`] maps to torchao configs):

- `int8`: int8 weights (one scale per output row), products in the activations' dtype (`Int8WeightOnlyConfig`);
- `int8-dynamic`: int8 weights and int8 activations quantized per token at every call, int32 products
  (`Int8DynamicActivationInt8WeightConfig`);
- `int4`: int4 weights in groups of 32 input features. On a CPU torchao runs it as its prototype CPU layout
  (`torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig`, the `_weight_int4pack_mm_for_cpu` kernel);
  the default `Int4WeightOnlyConfig` needs the `mslk` kernels (CUDA), so elsewhere `int4` is
  `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (CUDA, bfloat16).

The token head (`lm_head`) stays in the model's dtype (transformers keeps output embeddings unquantized).
`RARForImageGeneration.from_pretrained` runs [`check_quantization_config`] first: a torchao configuration this
machine cannot run (a layout whose kernels are not installed, float8 activations on a CPU) is refused in one line
before any weight is read. `model.get_memory_footprint()` counts torchao's tensors at the float32 size of the
weights; [`state_nbytes`] sums the bytes their storages really hold.
"""

import logging
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

QUANTIZATION_TYPES = ("int8", "int8-dynamic", "int4")
INT4_GROUP_SIZE = 32
INSTALL_HINT = 'pip install "rar-hf[quantization]" (torchao)'


# ------------------------------------------------------------------------------------------------ import noise
class _DropKnownNoise(logging.Filter):
    """Drops, by exact wording, three messages that installing torchao 0.18 prints on every import of transformers
    on a CPU-only torch, none of which concerns rar-hf:

    - torchao: "Failed to load .../_C_mxfp8...so" / "_C_cutlass_90a" (its wheel ships CUDA kernels only; a CPU-only
      torch cannot load them, and torchao's CPU paths do not use them);
    - torch.utils._pytree: "<enum ...> is an Enum subclass and is now natively supported by torch.compile" (a
      deprecation addressed to torchao's authors);
    - diffusers: "Unable to import `torchao` Tensor objects" (diffusers 0.42 looks for classes torchao moved; it
      concerns pickled torchao checkpoints of diffusers models, which rar-hf never loads).

    Without the filter every `rar-hf` command would print them above its own output, and a refused input would no
    longer end in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "torchao":
            return not (torch.version.cuda is None and message.startswith("Failed to load ") and "/torchao/_C" in message)
        if record.name == "torch.utils._pytree":
            return "is an Enum subclass and is now natively supported by torch.compile" not in message
        return "Unable to import `torchao` Tensor objects" not in message


_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def drop_torchao_import_noise() -> None:
    """Install [`_DropKnownNoise`] on the three loggers (idempotent; other messages of theirs still show)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())


# ------------------------------------------------------------------------------------------------ configurations
def is_torchao_available() -> bool:
    from transformers.utils import is_torchao_available

    return is_torchao_available()


def _require_torchao(what: str) -> None:
    if not is_torchao_available():
        raise ValueError(f"{what} needs torchao, which is not installed: {INSTALL_HINT}")


def torchao_config(name: str, device="cpu"):
    """The torchao configuration behind a `--quantize` name (see the module docstring), for weights on `device`."""
    if name not in QUANTIZATION_TYPES:
        raise ValueError(f"unknown quantization type {name!r}; expected one of {', '.join(QUANTIZATION_TYPES)}")
    _require_torchao(f"quantization type {name!r}")
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if name == "int8":
        return Int8WeightOnlyConfig()
    if name == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if torch.device(device).type == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError as error:  # a prototype API: it may move in later torchao releases
            raise ValueError(f"int4 on a CPU needs torchao's prototype CPU layout (torchao 0.18): {error}") from None
        return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


def quantization_config(name: str, device="cpu", dtype=torch.float32):
    """transformers' `TorchAoConfig` for a `--quantize` name, checked to run on `device` with `dtype` weights."""
    from transformers import TorchAoConfig

    config = TorchAoConfig(torchao_config(name, device))
    check_quantization_config(config, device, dtype)
    return config


def pipeline_quantization_config(name: str, device="cpu", dtype=torch.float32):
    """diffusers' `PipelineQuantizationConfig` quantizing a RARPipeline's transformer (the VQ model stays as it is:
    it runs once per image, after the token loop)."""
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={"transformer": quantization_config(name, device, dtype)})


def _device_of(device_map) -> torch.device:
    """The device weights loaded with `device_map` (as `from_pretrained` takes it) will be quantized on."""
    if isinstance(device_map, dict):
        devices = [d for d in device_map.values() if d not in ("cpu", "disk")]
        device_map = devices[0] if devices else "cpu"
    if device_map is None:
        return torch.device("cpu")
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _aoconfigs(quant_type) -> list:
    from torchao.quantization import FqnToConfig

    if isinstance(quant_type, FqnToConfig):
        return [c for c in quant_type.fqn_to_config.values() if c is not None]
    return [quant_type]


def _trial_error(aoconfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `aoconfig` cannot quantize and run a small linear layer on `device` in `dtype`, or None when it can."""
    from torchao.quantization import quantize_

    try:
        with torch.no_grad():
            layer = nn.Linear(256, 256, device=device, dtype=dtype)
            quantize_(layer, aoconfig)
            layer(torch.randn(2, 256, device=device, dtype=dtype))
    except Exception as error:  # an ImportError, AssertionError, RuntimeError...: each means "not here"
        return f"{type(error).__name__}: {' '.join(str(error).split())}" if str(error) else type(error).__name__
    return None


def check_quantization_config(config, device="cpu", dtype=torch.float32) -> None:
    """Raise a one-line `ValueError` unless torchao can quantize and run a linear layer with `config` (a transformers
    `TorchAoConfig`) on `device` with `dtype` weights. A trial on a 256 x 256 layer: milliseconds, before any weight
    is read. Other quantization configs (bitsandbytes, ...) are left to transformers."""
    if getattr(config, "quant_method", None) != "torchao":
        return
    _require_torchao("TorchAoConfig")
    device = _device_of(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    for aoconfig in _aoconfigs(config.quant_type):
        reason = _trial_error(aoconfig, device, dtype)
        if reason is None:
            continue
        runs = [name for name in QUANTIZATION_TYPES if _trial_error(torchao_config(name, device), device, dtype) is None]
        alternatives = f"; these run here: {', '.join(runs)} (rar_hf.quantization.torchao_config(name))" if runs else ""
        raise ValueError(
            f"torchao's {type(aoconfig).__name__} cannot run on this machine ({device.type}, "
            f"{str(dtype).replace('torch.', '')} weights): "
            f"{reason}{alternatives}"
        )


# ------------------------------------------------------------------------------------------------ what was quantized
def is_quantized_tensor(tensor) -> bool:
    """Whether `tensor` is a tensor subclass holding its data in inner tensors (torchao's `Int8Tensor`, ...)."""
    return isinstance(tensor, torch.Tensor) and is_traceable_wrapper_subclass(tensor)


def quantized_linear_layers(model: nn.Module) -> Counter:
    """How many `nn.Linear` layers of `model` hold each kind of weight: `Counter({"Int8Tensor": 96, "float32": 1})`."""
    kinds = Counter()
    for module in model.modules():
        weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if weight is not None:
            kinds[type(weight).__name__ if is_quantized_tensor(weight) else str(weight.dtype).replace("torch.", "")] += 1
    return kinds


def tensor_nbytes(tensor: torch.Tensor, seen: set | None = None) -> int:
    """Bytes held by `tensor`'s storage (its inner tensors' for a tensor subclass), each storage counted once in
    `seen`."""
    seen = set() if seen is None else seen
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(tensor, name), seen) for name in names if getattr(tensor, name) is not None)
    if tensor.device.type == "meta":
        return 0
    if tensor.layout != torch.strided:  # oneDNN's opaque packed weights: no storage to share
        key, nbytes = ("opaque", id(tensor)), tensor.numel() * tensor.element_size()
    else:
        storage = tensor.untyped_storage()
        key, nbytes = (tensor.device, storage.data_ptr()), storage.nbytes()
    if key in seen:
        return 0
    seen.add(key)
    return nbytes


def state_nbytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers of `model` really hold: torchao's quantized weights at their int8/int4 data
    plus scales (where `get_memory_footprint()` counts the float32 size), CPU-packed weights at their packed size,
    shared (tied) storages once."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values()]
        # A `rar_hf.cpu_kernels.PackedLinear` holds its weight outside its parameters (packed, or plain where it
        # cannot pack); read by name so that this module never imports the CPU kernels (they import it).
        held = getattr(module, "packed_weight", None)
        tensors.append(held if held is not None else getattr(module, "plain_weight", None))
        total += sum(tensor_nbytes(t, seen) for t in tensors if t is not None)
    return total
