"""Linear layers that run on oneDNN-prepacked weights during CPU generation.

A KV-cached decoding step multiplies a handful of rows (2 x batch with guidance) by every weight of the model, so on
CPU its cost is how fast the GEMM kernel streams the weights. With so few rows the BLAS behind `F.linear` reads them
at ~11 GB/s on the 2-core development machine; the same product on a weight reordered once into oneDNN's blocked
layout (what inductor does when it freezes a CPU graph) reads them at ~35-40 GB/s. `generate()` packs the weights of
the decoder's `PrepackedLinear` layers for the length of the call.

The packed weight *replaces* the plain one while it is attached: the parameter keeps its identity but holds an empty
tensor, so the model never holds two copies of its weights (a RAR-B float32 call would otherwise need 1 GB more).
The plain weight is restored, bit for bit (oneDNN's reorder back to the plain layout is a copy), when the block ends,
and earlier whenever something needs it: `train()`, `.to()`/`.float()`, `load_state_dict`, a forward that needs
autograd or another dtype. `state_dict()` (hence `save_pretrained`) is unchanged: it reads the plain weight back
from the packed one.

Under `torch.compile` the packed product is the custom op `rar_hf::packed_linear`, opaque to the compiler, which
keeps fusing everything around it (norms, modulation, gelu, residuals); the packed weight itself stays outside the
graph, found from the layer's key.
"""

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Live packed layers by key, so that the compiled graph refers to an int and never to the opaque oneDNN tensor.
_PACKED_LAYERS: "weakref.WeakValueDictionary[int, PrepackedLinear]" = weakref.WeakValueDictionary()


# oneDNN's kernel for 1-3 rows streams the weights ~15-25% slower than its kernel for 8 rows on the development CPU;
# rows are independent, so padding them with zeros gives the same products (to rounding: the kernel differs) faster.
_MIN_ROWS = 4
_PADDED_ROWS = 8


def packed_product(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
    if 0 < rows < _MIN_ROWS:
        flat = F.pad(input.reshape(rows, input.shape[-1]), (0, 0, 0, _PADDED_ROWS - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
        return out[:rows].reshape(*input.shape[:-1], out.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


@torch.library.custom_op("rar_hf::packed_linear", mutates_args=())
def packed_linear(input: torch.Tensor, key: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """`input @ W.T + bias` with the oneDNN-packed weight of the `PrepackedLinear` registered under `key`."""
    return packed_product(input, _PACKED_LAYERS[key].packed_weight, bias)


@packed_linear.register_fake
def _(input, key, bias, out_features):
    return input.new_empty((*input.shape[:-1], out_features))


class PrepackedLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) that runs on a packed copy of its weight while one is attached.

    The packed path is taken only without autograd and for inputs of the weight's dtype on CPU; everything else
    (training, other devices) is the plain `F.linear`, after restoring the plain weight if it was released.
    """

    packed_weight: torch.Tensor | None = None
    # id(self) while packed, else None: what a compiled graph passes to rar_hf::packed_linear.
    packed_key: int | None = None
    packed_dtype: torch.dtype | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            key = self.packed_key
            if key is not None and not torch.is_grad_enabled() and input.dtype == self.packed_dtype:
                return packed_linear(input, key, self.bias, self.out_features)
            return F.linear(input, self.weight, self.bias)
        # Read once, so that another thread's generate() releasing it cannot leave this call without a weight.
        packed = self.packed_weight
        if packed is not None and not torch.is_grad_enabled() and input.device.type == "cpu":
            if input.dtype == packed.dtype:
                return packed_product(input, packed, self.bias)
        return F.linear(input, self.weight, self.bias)  # `self.weight` restores a released weight

    # ------------------------------------------------------------------------------------------------ packing
    def _weight_released(self) -> bool:
        weight = self._parameters["weight"]
        return self.packed_weight is not None and weight.numel() == 0 and self.in_features * self.out_features > 0

    @torch.no_grad()
    def pack(self, num_rows: int | None = None, release: bool = True) -> None:
        """Attach a oneDNN-packed copy of the weight; with `release`, the plain weight's memory is freed meanwhile."""
        if self.packed_weight is not None:
            return
        weight = self._parameters["weight"]
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), num_rows)
        self.packed_key, self.packed_dtype = id(self), weight.dtype
        _PACKED_LAYERS[self.packed_key] = self
        if release:
            # Same Parameter object (optimizers, hooks and tied references keep pointing at it), empty storage.
            weight.data = weight.data.new_empty(0)

    @torch.no_grad()
    def unpack(self) -> None:
        """Drop the packed copy, restoring the plain weight from it first if it was released."""
        packed = self.packed_weight
        if packed is None:
            return
        if self._weight_released():
            self._parameters["weight"].data = packed.to_dense()
        _PACKED_LAYERS.pop(self.packed_key, None)
        self.packed_weight, self.packed_key, self.packed_dtype = None, None, None

    # Everything that needs the plain weight gets it back first: reading `.weight`, training, moving or casting,
    # loading, copying or pickling.
    def __getattr__(self, name):
        if name == "weight" and self.__dict__.get("packed_weight") is not None and self._weight_released():
            self.unpack()
        return super().__getattr__(name)

    def train(self, mode: bool = True):
        if mode:
            self.unpack()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        self.unpack()
        return super().__getstate__()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        packed = self.packed_weight
        if packed is not None and self._weight_released():
            # What the state dict always held: the plain weight (read back from the packed copy, which stays).
            destination[prefix + "weight"] = packed.to_dense()


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight here: a float32 (or, where the CPU supports it, bfloat16) CPU tensor."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fits_in_memory(num_bytes: int) -> bool:
    """Whether `num_bytes` more would take at most half of the memory available now (psutil's figure)."""
    try:
        import psutil
    except ImportError:  # no way to tell: pack, as without the check
        return True
    return num_bytes <= psutil.virtual_memory().available // 2


def _packable_layers(model: nn.Module) -> list[PrepackedLinear]:
    layers = [m for m in model.modules() if isinstance(m, PrepackedLinear)]
    return [m for m in layers if m.packed_weight is None and can_prepack(m._parameters["weight"])]


def _pack_layers(layers: list[PrepackedLinear], num_rows: int | None, release: bool) -> list[PrepackedLinear]:
    """Pack `layers` one by one (so that, releasing, memory never holds more than one extra layer); the packed ones."""
    packed = []
    try:
        for layer in layers:
            layer.pack(num_rows, release=release)
            packed.append(layer)
    except RuntimeError as error:  # an unusual build or CPU: the plain path is always correct
        logger.info(f"oneDNN weight packing unavailable ({error}); using F.linear.")
        for layer in packed:
            layer.unpack()
        packed = []
    return packed


def pack_linear_weights(model: nn.Module, num_rows: int | None = None) -> int:
    """Replace the weights of every `PrepackedLinear` of `model` by oneDNN-packed ones, until they are needed again.

    What `generate()` does on CPU: an inference model then stays packed across calls (packing costs about one second
    for RAR-B, mostly first-touch page faults) and holds one copy of its weights. The plain weights come back, bit for
    bit, with `unpack_linear_weights(model)` or as soon as something needs them (`train()`, `.to()`, reading a
    `.weight`, `load_state_dict`, a forward with autograd); `state_dict()`/`save_pretrained` are unchanged meanwhile.
    Until then `model.parameters()` yields empty tensors for the packed weights. Returns the number of layers packed.
    """
    return len(_pack_layers(_packable_layers(model), num_rows, release=True))


def unpack_linear_weights(model: nn.Module) -> None:
    """Restore the plain weights of every packed `PrepackedLinear` of `model` and drop the packed copies."""
    for module in model.modules():
        if isinstance(module, PrepackedLinear):
            module.unpack()


@contextmanager
def prepacked_linear_weights(model: nn.Module, num_rows: int | None = None, enabled: bool = True, release: bool = True):
    """Run every `PrepackedLinear` of `model` on oneDNN-packed weights for the duration of the block.

    `num_rows` is the number of rows each product will have (a hint for the packed layout). With `release` (the
    default) each packed weight replaces the plain one, layer by layer, so memory does not grow; the plain weights are
    restored, bit for bit, when the block ends. `release=False` keeps both copies (packing then needs as much memory
    again, and is skipped with a warning when that would take more than half of the available memory). Does nothing
    when `enabled` is false, off CPU, or for dtypes oneDNN does not pack.

    Blocks nest: layers that are already packed are left as they are, and only the layers this block packed are
    restored at its end. Inside the block `state_dict()` and `save_pretrained` are unchanged, and `train()`, `.to()`,
    reading a `.weight` or a forward with autograd restore the plain weights of the layers they touch. The packed
    copies are snapshots: change weights only after such a restore.
    """
    layers = _packable_layers(model) if enabled else []
    if layers and not release:
        num_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
        if not fits_in_memory(num_bytes):
            # A speed-up must not be what runs the machine out of memory.
            logger.warning_once(
                f"Not prepacking the linear weights: the copies ({num_bytes / 2**30:.1f} GiB) would take more than "
                "half of the available memory. The layers run on F.linear (about 2x slower)."
            )
            layers = []
    packed = _pack_layers(layers, num_rows, release)
    try:
        yield
    finally:
        for layer in packed:
            layer.unpack()
