"""Opt-in CPU fast paths for RAR inference: packed linear layers and a decoding attention.

Decoding one token per row is bound by reading the weights and the KV cache. On a CPU, PyTorch's general kernels
leave speed on the table there:

- **Packed linears.** A skinny product (a few rows) on an `nn.Linear` weight streams it at ~11 GB/s through the BLAS
  behind `F.linear` on the 2-core development machine; the same product on a weight reordered once into oneDNN's
  blocked layout (what inductor does when it freezes a CPU graph) reads it at ~35-40 GB/s. [`PackedLinear`] holds
  only the packed copy (memory holds one copy of the weights) and runs inference only.
- **Decoding attention** (`attn_implementation="rar_cpu_sdpa"`): for one new query per row on the CPU it attends
  over the filled slots of a static cache only, and in half precision computes in float32 products over the
  half-precision cache (PyTorch's bfloat16 CPU sdpa kernel is 2-4x slower at one query per row). Everything else
  (prefill, training, other devices, `output_attentions`) is transformers' sdpa. Under `torch.compile` the filled-slot
  attention is the opaque custom op `rar_hf::filled_slots_attention`, which reads the slot count at run time.

Both are explicit, reversible swaps, in the pattern of transformers' `replace_with_bnb_linear` and its attention
interface: the model's own classes stay plain `nn.Linear` / sdpa, so PEFT, quantizers, accelerate hooks and
`num_parameters()` see ordinary modules until the caller opts in, and get them back on opt-out.

```py
from rar_hf import enable_cpu_fast_paths, disable_cpu_fast_paths, cpu_fast_paths

enable_cpu_fast_paths(model)      # packs the linears (model.parameters() no longer lists their weights) + attention
tokens = model.generate(class_labels=[3])
disable_cpu_fast_paths(model)     # plain nn.Linear and sdpa again, the weights restored bit for bit

with cpu_fast_paths(model):       # the same for one block (what RARPipeline does per call on a CPU by default)
    tokens = model.generate(class_labels=[3])
```
"""

import weakref
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging

from .quantization import is_quantized_tensor

logger = logging.get_logger(__name__)

CPU_ATTENTION = "rar_cpu_sdpa"

# ------------------------------------------------------------------------------------------------ packed linears
# Live packed layers by key, so that a compiled graph refers to an int and never to the opaque oneDNN tensor.
_PACKED_LAYERS: "weakref.WeakValueDictionary[int, PackedLinear]" = weakref.WeakValueDictionary()

# oneDNN's kernel for 1-3 rows streams the weights ~15-25% slower than its kernel for 8 rows on the development CPU;
# rows are independent, so padding them with zeros gives the same products (to rounding: the kernel differs) faster.
_MIN_ROWS = 4
_PADDED_ROWS = 8


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight here: a float32 (or, where the CPU supports it, bfloat16) CPU tensor."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() or type(weight.data) is not torch.Tensor:
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packed_product(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
    if 0 < rows < _MIN_ROWS:
        flat = F.pad(input.reshape(rows, input.shape[-1]), (0, 0, 0, _PADDED_ROWS - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
        return out[:rows].reshape(*input.shape[:-1], out.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


@torch.library.custom_op("rar_hf::packed_linear", mutates_args=())
def packed_linear(input: torch.Tensor, key: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """`input @ W.T + bias` with the oneDNN-packed weight of the [`PackedLinear`] registered under `key`."""
    return packed_product(input, _PACKED_LAYERS[key].packed_weight, bias)


@packed_linear.register_fake
def _(input, key, bias, out_features):
    return input.new_empty((*input.shape[:-1], out_features))


class PackedLinear(nn.Module):
    r"""
    Inference-only CPU stand-in for an `nn.Linear`, holding its weight in oneDNN's packed layout (and no plain copy).

    Made by [`replace_with_packed_linear`], undone by [`replace_with_plain_linear`] (which rebuilds the original
    class with the weight restored bit for bit). The bias stays the same `nn.Parameter`; the weight is not a
    parameter while packed, but `state_dict()` (hence `save_pretrained`) still holds it in the plain layout, and
    `load_state_dict` repacks what it loads. Under `torch.compile` the product is the custom op
    `rar_hf::packed_linear`, opaque to the compiler, which keeps fusing what surrounds it.
    """

    def __init__(self, linear: nn.Linear, num_rows: int | None = None):
        super().__init__()
        if is_quantized_tensor(linear.weight):
            raise ValueError(
                f"This linear layer holds a quantized weight ({type(linear.weight).__name__}): PackedLinear packs "
                "float32/bfloat16 weights only; a quantized layer keeps its quantization library's kernels."
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.original_class = type(linear)
        self.bias = linear.bias
        self._pack(linear.weight.detach(), num_rows)
        self.train(linear.training)

    def _pack(self, weight: torch.Tensor, num_rows: int | None = None):
        """Hold `weight` packed when oneDNN can pack it here, else as it is (moved to another device or dtype, the
        layer runs `F.linear`)."""
        self.num_rows = num_rows
        self.packed_dtype = weight.dtype
        self.key = id(self)
        if can_pack(weight):
            self.packed_weight, self.plain_weight = torch.ops.mkldnn._reorder_linear_weight(weight, num_rows), None
            _PACKED_LAYERS[self.key] = self
        else:
            self.packed_weight, self.plain_weight = None, weight
            _PACKED_LAYERS.pop(self.key, None)

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the plain layout (a copy; change weights only after [`replace_with_plain_linear`])."""
        return self.packed_weight.to_dense() if self.packed_weight is not None else self.plain_weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training or input.requires_grad:
            raise RuntimeError(
                "PackedLinear is an inference-only CPU kernel (no gradients): call "
                "rar_hf.disable_cpu_fast_paths(model) (or replace_with_plain_linear) before training."
            )
        if self.packed_weight is None:  # moved off the CPU or to a dtype oneDNN does not pack
            return F.linear(input, self.plain_weight, self.bias)
        if torch.compiler.is_compiling():
            return packed_linear(input, self.key, self.bias, self.out_features)
        with torch.no_grad():
            if input.dtype != self.packed_dtype:
                return F.linear(input, self.weight.to(input.dtype), None if self.bias is None else self.bias.to(input.dtype))
            return packed_product(input, self.packed_weight, self.bias)

    def _apply(self, fn, recurse=True):
        # .to()/.float()/.cuda(): the weight follows, repacked if oneDNN can pack it there, else held plain (the layer
        # then runs F.linear; disable_cpu_fast_paths gives the nn.Linear back).
        moved = fn(self.weight)
        if moved.device != self.weight.device or moved.dtype != self.weight.dtype:
            self._pack(moved, self.num_rows)
            if self.packed_weight is None:
                logger.warning_once(
                    f"Packed CPU linear layers moved to {moved.device}/{moved.dtype} run F.linear: call "
                    "rar_hf.disable_cpu_fast_paths(model) to get plain nn.Linear layers back."
                )
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # deepcopy and pickle: oneDNN's opaque tensor has no storage to copy, so the plain weight travels instead.
        state = super().__getstate__().copy()
        state["packed_weight"], state["plain_weight"] = None, self.weight
        return state

    def __setstate__(self, state):
        weight = state.pop("plain_weight")
        super().__setstate__(state)
        self._pack(weight, self.num_rows)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} vs the packed layer's shape.")
        else:
            self._pack(weight.detach().to(self.packed_dtype), self.num_rows)
        state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def unpack(self) -> nn.Linear:
        """The original `nn.Linear` (class included), its weight restored bit for bit (oneDNN's reorder is a copy)."""
        linear = self.original_class.__new__(self.original_class)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = nn.Parameter(self.weight)
        linear.bias = self.bias
        linear.train(self.training)
        return linear


def _swap(model: nn.Module, convert) -> int:
    count = 0
    # Hold the parents only (not the layers themselves), so that each replaced layer is freed as soon as it is swapped.
    parents = [module for module in model.modules() if next(module.children(), None) is not None]
    for parent in parents:
        for name in [name for name, _ in parent.named_children()]:
            child = getattr(parent, name)
            replacement = convert(child)
            if replacement is not None:
                setattr(parent, name, replacement)
                count += 1
    return count


@torch.no_grad()
def replace_with_packed_linear(model: nn.Module, num_rows: int | None = 8, modules_to_not_convert=()) -> int:
    """Replace every packable `nn.Linear` of `model` (float32, or bfloat16 where supported, on the CPU) by a
    [`PackedLinear`], one layer at a time (memory never holds more than one extra layer). `num_rows` is the number
    of rows the products will have (a layout hint: oneDNN's layout for 1-2 rows streams 3x slower, so at least 8).
    Returns the number of layers replaced.

    Layers whose weight is quantized (torchao's tensor subclasses, e.g. after `from_pretrained(...,
    quantization_config=TorchAoConfig(...))`) are left to the quantization library's kernels, and a log line says how
    many; [`PackedLinear`] itself refuses them."""
    quantized = Counter()

    def convert(child):
        if type(child) is PackedLinear or not isinstance(child, nn.Linear):
            return None
        if is_quantized_tensor(child.weight):
            quantized[type(child.weight).__name__] += 1
            return None
        if not can_pack(child.weight):
            return None
        if modules_to_not_convert and any(key in _module_name(model, child) for key in modules_to_not_convert):
            return None
        return PackedLinear(child, num_rows)

    try:
        count = _swap(model, convert)
    except RuntimeError as error:  # an unusual build or CPU: the plain layers are always correct
        logger.warning(f"oneDNN weight packing unavailable ({error}); keeping nn.Linear.")
        replace_with_plain_linear(model)
        return 0
    if quantized:
        kinds = ", ".join(f"{n} {kind}" if len(quantized) > 1 else kind for kind, n in sorted(quantized.items()))
        logger.warning_once(
            f"CPU fast paths: {sum(quantized.values())} quantized linear layers ({kinds}) keep their own (torchao) "
            f"kernels; {count} float layer{'s' if count != 1 else ''} packed."
        )
    return count


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), "")


@torch.no_grad()
def replace_with_plain_linear(model: nn.Module) -> int:
    """Undo [`replace_with_packed_linear`]: every [`PackedLinear`] becomes its original `nn.Linear` again. Returns
    the number of layers restored."""
    return _swap(model, lambda child: child.unpack() if type(child) is PackedLinear else None)


def has_packed_linear(model: nn.Module) -> bool:
    return any(type(module) is PackedLinear for module in model.modules())


# ------------------------------------------------------------------------------------------------ decoding attention
def decoding_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of `(B, H, 1, D)` queries over the cache, computed in float32 from the half-precision keys/values."""
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)).mul_(scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    attn_output = torch.matmul(weights, value.float()).to(query.dtype).transpose(1, 2)
    return attn_output, None


@torch.library.custom_op("rar_hf::filled_slots_attention", mutates_args=())
def filled_slots_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, last_position: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`(B, 1, H, D)` sdpa of `(B, H, 1, D)` queries over the cache slots `0..last_position` of `key`/`value`."""
    length = int(last_position[0]) + 1
    key, value = key[:, :, :length], value[:, :, :length]
    return F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2).contiguous()


@filled_slots_attention.register_fake
def _(query, key, value, last_position, scaling):
    batch_size, num_heads, seq_len, head_dim = query.shape
    return query.new_empty((batch_size, seq_len, num_heads, head_dim))


def cpu_decoding_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs
):
    """`attn_implementation="rar_cpu_sdpa"`: transformers' sdpa, except for one-token inference steps on the CPU,
    which attend over the filled cache slots only (`position_ids`: the query's cache slot), in float32 products for
    half-precision caches."""
    decoding = (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and position_ids is not None
        and not torch.is_grad_enabled()
        and not kwargs.get("output_attentions")
    )
    if not decoding:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_ids=position_ids,
            **kwargs,
        )  # fmt: skip
    last_slot = position_ids.reshape(-1)[-1:]
    half = query.dtype in (torch.bfloat16, torch.float16)
    if torch.compiler.is_compiling():
        # A slot count the graph cannot know without recompiling at every step: the opaque op reads it at run time.
        # In half precision, inductor's own fusion of the float32 products over all slots is faster (42 against 46 ms
        # per RAR-B step).
        if not half:
            return filled_slots_attention(query, key, value, last_slot, scaling), None
        return decoding_attention_forward(module, query, key, value, attention_mask, scaling)
    length = int(last_slot) + 1
    if key.shape[-2] > length:  # a static cache returns all its slots; the ones past the sequence are masked anyway
        key, value = key[:, :, :length], value[:, :, :length]
        attention_mask = attention_mask[..., :length] if isinstance(attention_mask, torch.Tensor) else attention_mask
    if half:
        return decoding_attention_forward(module, query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# Registered by name, as transformers documents for custom attention functions (with sdpa's mask format).
AttentionInterface.register(CPU_ATTENTION, cpu_decoding_attention_forward)
AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)


# ------------------------------------------------------------------------------------------------ opt-in
def enable_cpu_fast_paths(model: nn.Module, num_rows: int | None = 8) -> bool:
    """Pack `model`'s linear layers and select the CPU decoding attention (when the model is on the CPU and its
    attention is sdpa). Returns whether anything changed; undo with [`disable_cpu_fast_paths`]."""
    if next(model.parameters()).device.type != "cpu":
        return False
    changed = replace_with_packed_linear(model, num_rows) > 0
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(CPU_ATTENTION)
        changed = True
    return changed


def disable_cpu_fast_paths(model: nn.Module) -> None:
    """Plain `nn.Linear` layers (weights restored bit for bit) and sdpa again."""
    replace_with_plain_linear(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == CPU_ATTENTION:
        model.set_attn_implementation("sdpa")


def cpu_fast_paths_enabled(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return has_packed_linear(model) or getattr(config, "_attn_implementation", None) == CPU_ATTENTION


@contextmanager
def cpu_fast_paths(model: nn.Module, num_rows: int | None = 8, enabled: bool = True):
    """[`enable_cpu_fast_paths`] for the duration of the block, then everything as it was (a model that was already
    enabled stays enabled)."""
    changed = enabled and not cpu_fast_paths_enabled(model) and enable_cpu_fast_paths(model, num_rows)
    try:
        yield model
    finally:
        if changed:
            disable_cpu_fast_paths(model)
