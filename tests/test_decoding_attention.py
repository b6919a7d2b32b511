import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache

from rar_hf import modeling_rar
from rar_hf.modeling_rar import decoding_attention_forward

from test_modeling_rar import tiny_model


def _cache_like(dtype, filled=5, slots=9):
    """One new query per row over a static-cache-like key/value tensor whose slots past `filled` hold garbage."""
    torch.manual_seed(0)
    query = torch.randn(3, 4, 1, 16).to(dtype)
    key, value = torch.randn(3, 4, slots, 16).to(dtype), torch.randn(3, 4, slots, 16).to(dtype)
    key[:, :, filled:], value[:, :, filled:] = 1e4, -1e4  # would dominate the result if they were attended
    allowed = torch.zeros(3, 1, 1, slots, dtype=torch.bool)
    allowed[..., :filled] = True
    return query, key, value, allowed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "sliced"])
def test_decoding_attention_matches_exact_attention(dtype, mask_kind):
    query, key, value, allowed = _cache_like(dtype)
    if mask_kind == "bool":
        mask = allowed
    elif mask_kind == "additive":
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    else:  # what the model passes when it reads only the filled slots
        key, value, mask = key[:, :, :5], value[:, :, :5], None
    exact = F.scaled_dot_product_attention(
        query.double(), key[:, :, :5].double(), value[:, :, :5].double(), scale=0.25
    ).transpose(1, 2)
    output, weights = decoding_attention_forward(None, query, key, value, mask, scaling=0.25)
    assert output.dtype == dtype and output.shape == (3, 1, 4, 16) and weights is None
    # Computed in float32 from the half-precision inputs: only the final rounding to `dtype` remains.
    torch.testing.assert_close(output.double(), exact, atol=1e-2, rtol=1e-2)
    assert (output.double() - exact).abs().max() <= (exact.abs().max() * torch.finfo(dtype).eps).item() * 2


def _stepwise_logits(model, sequence):
    """Teacher-forced logits of `sequence` (class token, then image tokens) decoded one token at a time with a cache."""
    cache = StaticCache(config=model.config, max_cache_len=sequence.shape[1] + 1)
    logits = [model(input_ids=sequence[:, :2], cache=cache, use_cache=True).logits]
    for j in range(2, sequence.shape[1]):
        step = model(
            input_ids=sequence[:, j : j + 1],
            condition_ids=sequence[:, 0],
            cache=cache,
            use_cache=True,
            cache_position=torch.tensor([j + 1]),
        )
        logits.append(step.logits)
    return torch.cat(logits, dim=1).double()


@torch.no_grad()
def test_half_precision_decoding_steps_use_it_and_stay_within_rounding(monkeypatch):
    model = tiny_model()
    sequence = model.generate(class_labels=[1, 7, None], guidance_scale=3.0, max_new_tokens=10)
    exact = model.double()(input_ids=sequence).logits
    model = model.to(torch.bfloat16)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return decoding_attention_forward(*args, **kwargs)

    monkeypatch.setattr(modeling_rar, "decoding_attention_forward", counted)
    fast = _stepwise_logits(model, sequence)
    # Every one-token step of every layer; the first call (cls, class and first token) runs sdpa.
    assert len(calls) == 9 * model.config.num_hidden_layers and all(shape[2] == 1 for shape in calls)

    calls.clear()
    monkeypatch.setattr(modeling_rar, "uses_decoding_attention", lambda *args: False)
    plain = _stepwise_logits(model, sequence)
    assert not calls
    # Both are bfloat16 models; the float32 attention must not add error beyond bfloat16's own.
    # Logits of the one-token steps (the first call's two are the same sdpa computation in both).
    fast, plain, exact = fast[:, 2:], plain[:, 2:], exact[:, 2:]
    fast_error, plain_error = (fast - exact).abs().max(), (plain - exact).abs().max()
    assert fast_error <= 1.25 * plain_error, (fast_error, plain_error)
    assert fast_error < 0.05 * exact.abs().max()


def test_float32_decoding_keeps_sdpa(monkeypatch):
    # float32 steps keep PyTorch's kernel: the bit-exact parity with the official samples depends on its rounding.
    calls = []
    monkeypatch.setattr(modeling_rar, "decoding_attention_forward", lambda *a, **k: calls.append(1))
    tiny_model().generate(class_labels=[1], guidance_scale=2.0, do_sample=False, max_new_tokens=4)
    assert not calls
