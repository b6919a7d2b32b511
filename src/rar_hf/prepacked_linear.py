"""Linear layers that run on oneDNN-prepacked weights during CPU generation.

A KV-cached decoding step multiplies a handful of rows (2 x batch with guidance) by every weight of the model, so on
CPU its cost is how fast the GEMM kernel streams the weights. With so few rows the BLAS behind `F.linear` reads them
at ~11 GB/s on the 2-core development machine; the same product on a weight reordered once into oneDNN's blocked
layout (what inductor does when it freezes a CPU graph) reads them at ~35-40 GB/s. `generate()` packs the weights of
the decoder's `PrepackedLinear` layers for the length of the call and frees the copies afterwards.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


class PrepackedLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) that uses a packed copy of its weight while one is attached.

    The packed path is taken only without autograd, outside torch.compile tracing and for inputs of the weight's
    dtype on CPU; everything else (training, other devices) is the plain `F.linear`.
    """

    packed_weight: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # is_compiling() first: torch.compile then never sees the packed (opaque oneDNN) tensor. The attribute is read
        # once, so that another thread's generate() releasing it cannot leave this call without a weight.
        if not torch.compiler.is_compiling():
            packed = self.packed_weight
            if (
                packed is not None
                and not torch.is_grad_enabled()
                and input.device.type == "cpu"
                and input.dtype == self.weight.dtype
            ):
                return torch.ops.mkldnn._linear_pointwise(input, packed, self.bias, "none", [], "")
        return F.linear(input, self.weight, self.bias)


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
    """Whether `num_bytes` of packed copies would take at most half of the memory available now (psutil's figure)."""
    try:
        import psutil
    except ImportError:  # no way to tell: pack, as without the check
        return True
    return num_bytes <= psutil.virtual_memory().available // 2


@contextmanager
def prepacked_linear_weights(model: nn.Module, num_rows: int | None = None, enabled: bool = True):
    """Attach packed weights to every `PrepackedLinear` of `model` for the duration of the block.

    `num_rows` is the number of rows each product will have (a hint for the packed layout). Packing costs about one
    pass over freshly allocated memory (0.2-1 s for RAR-B on 2 cores) and holds a second copy of the weights until the
    block ends. Does nothing when `enabled` is false, off CPU, or for dtypes oneDNN does not pack.

    Blocks nest: layers that are already packed are left as they are, and only the layers this block packed are
    released at its end. So one block around a loop of `generate()` calls packs once for all of them:

        with prepacked_linear_weights(model, num_rows=2 * batch_size):
            for labels in batches:
                model.generate(class_labels=labels)

    The packed copies are snapshots: do not change the weights inside the block.
    """
    layers = [m for m in model.modules() if isinstance(m, PrepackedLinear)] if enabled else []
    layers = [m for m in layers if m.packed_weight is None and can_prepack(m.weight)]
    num_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if layers and not fits_in_memory(num_bytes):
        # A speed-up must not be what runs the machine out of memory.
        logger.warning_once(
            f"Not prepacking the linear weights for CPU generation: the copies ({num_bytes / 2**30:.1f} GiB) would "
            "take more than half of the available memory. Generation runs on F.linear (about 2x slower); "
            "generate(prepack_weights=False) silences this warning."
        )
        layers = []
    try:
        for layer in layers:
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), num_rows)
    except RuntimeError as error:  # an unusual build or CPU: the plain path is always correct
        logger.info(f"oneDNN weight packing unavailable ({error}); using F.linear.")
        for layer in layers:
            layer.packed_weight = None
        layers = []
    try:
        yield
    finally:
        for layer in layers:
            layer.packed_weight = None
