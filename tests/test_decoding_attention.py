import pytest
import torch
import torch.nn.functional as F
from transformers import CompileConfig, StaticCache

from rar_hf import modeling_rar
from rar_hf.decoding_attention import filled_slots_attention
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filled_slots_attention_reads_only_the_filled_slots(dtype):
    query, key, value, _ = _cache_like(dtype, filled=5, slots=9)
    output = filled_slots_attention(query, key, value, torch.tensor([4]), 0.25)
    exact = F.scaled_dot_product_attention(
        query.double(), key[:, :, :5].double(), value[:, :, :5].double(), scale=0.25
    ).transpose(1, 2)
    assert output.shape == (3, 1, 4, 16) and output.dtype == dtype
    torch.testing.assert_close(output.double(), exact, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_steps_attend_over_the_filled_slots_or_fused_products(dtype):
    model = tiny_model().to(dtype)
    kwargs = dict(class_labels=[1, 2, None], guidance_scale=2.0, do_sample=False, cache_implementation="static")
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    eager = model.generate(**kwargs, disable_compile=True)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = CompileConfig(fullgraph=True, backend=recording_backend, mode=None)
    compile_config._compile_all_devices = True  # CPU: the automatic compilation is opt-in there
    torch._dynamo.reset()
    try:
        compiled = model.generate(**kwargs, compile_config=compile_config)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1  # the decoding step; no recompilation as the filled length grows
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    # float32: the opaque op over the filled slots; bfloat16: float32 products the compiler fuses with the upcast.
    expected_ops = model.config.num_hidden_layers if dtype == torch.float32 else 0
    assert targets.count(torch.ops.rar_hf.filled_slots_attention.default) == expected_ops
    assert F.scaled_dot_product_attention not in targets
    if dtype == torch.float32:  # same kernel, same slots: the same numbers
        assert torch.equal(compiled.sequences, eager.sequences)
        torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), atol=1e-5, rtol=1e-5)
    else:  # inductor rounds the fused bfloat16 ops its own way: compare the steps before any token differs
        same = (compiled.sequences == eager.sequences).all(dim=0)[1:].long().cumprod(0).sum()
        assert same >= 1
        torch.testing.assert_close(
            torch.stack(compiled.scores[:same]), torch.stack(eager.scores[:same]), atol=5e-2, rtol=5e-2
        )
