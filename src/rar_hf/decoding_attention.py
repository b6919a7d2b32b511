"""Attention of a decoding step on CPU: one new query per row over the KV cache.

Two things make PyTorch's general kernels a poor fit there. In half precision, its CPU sdpa kernel is several times
slower than float32 products over the same cache (`decoding_attention_forward`). Under `torch.compile`, a static cache
hands the graph all its slots, and attending over only the filled ones needs a length the graph cannot know without
recompiling at every step: `filled_slots_attention` is an opaque custom op that reads the length from the step's
position at run time, so the compiled step reads no more of the cache than an eager one.
"""

import torch
import torch.nn.functional as F


def uses_decoding_attention(query: torch.Tensor, implementation: str, kwargs: dict) -> bool:
    """Whether a one-token step in half precision on CPU attends with `decoding_attention_forward` instead of sdpa.

    With one new query per row, PyTorch's CPU sdpa kernel is 2-4x slower in bfloat16 than float32 products over the
    same half-precision cache (measured on RAR-B, batch 4, a layer's 257 cached slots: 1.6 ms against 0.47 ms), which
    made a bfloat16 image barely faster to sample than a float32 one. Float32 steps keep sdpa (and its rounding).
    """
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and implementation == "sdpa"
        and not torch.is_grad_enabled()
        and not kwargs.get("output_attentions")
    )


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
    """`(B, 1, H, D)` sdpa of `(B, H, 1, D)` queries over the cache slots `0..last_position` of `key`/`value`.

    Compiled steps route only float32 here; in half precision the compiler's fusion of `decoding_attention_forward`
    over all slots is faster.
    """
    length = int(last_position[0]) + 1
    key, value = key[:, :, :length], value[:, :, :length]
    return F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2).contiguous()


@filled_slots_attention.register_fake
def _(query, key, value, last_position, scaling):
    batch_size, num_heads, seq_len, head_dim = query.shape
    return query.new_empty((batch_size, seq_len, num_heads, head_dim))
