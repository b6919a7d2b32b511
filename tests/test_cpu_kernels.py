"""The opt-in CPU fast paths (`rar_hf.cpu_kernels`): packed linears and the decoding attention are explicit,
reversible swaps that never happen as a side effect, and give what the plain model gives."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import CompileConfig, StaticCache

from rar_hf import cpu_fast_paths, disable_cpu_fast_paths, enable_cpu_fast_paths, replace_with_packed_linear
from rar_hf import cpu_kernels, replace_with_plain_linear
from rar_hf.cpu_kernels import CPU_ATTENTION, PackedLinear, can_pack, decoding_attention_forward, filled_slots_attention
from rar_hf.modeling_rar import RARAdaLNModulation

from test_modeling_rar import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

needs_onednn = pytest.mark.skipif(
    not can_pack(torch.zeros(1)), reason="this torch build cannot pack float32 weights with oneDNN"
)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    current = model.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------ packed linears
@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_matches_f_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias).eval()
    packed = PackedLinear(linear, num_rows=8)
    # 2-D, 3-D, strided, and 1-3 rows (padded to 8 rows inside)
    inputs = [torch.randn(8, 48), torch.randn(2, 5, 48), torch.randn(8, 96)[:, ::2], torch.randn(1, 48), torch.randn(3, 1, 48)]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.weight, linear.weight) and packed.bias is linear.bias


@needs_onednn
def test_generate_never_changes_the_model_and_the_swap_is_explicit_and_reversible(tmp_path):
    model = tiny_model()
    state, num_parameters = _state(model), model.num_parameters()
    parameters = dict(model.named_parameters())
    kwargs = dict(class_labels=[1, 7, None], guidance_scale=3.0, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)  # fmt: skip
    plain = model.generate(**kwargs)
    # generate() leaves parameters(), num_parameters() and state_dict() as they were.
    assert model.num_parameters() == num_parameters and _same_state(model, state)
    assert all(parameters[name] is p for name, p in model.named_parameters())
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    model.save_pretrained(tmp_path / "before")

    assert enable_cpu_fast_paths(model)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 5 * model.config.num_hidden_layers + 2  # qkv, o, fc1, fc2, adaLN per layer; final; head
    assert model.config._attn_implementation == CPU_ATTENTION
    # The packed weights are not parameters (one copy in memory), but the state dict still holds them, plain.
    assert model.num_parameters() < num_parameters and _same_state(model, state)
    model.save_pretrained(tmp_path / "packed")
    assert (tmp_path / "before" / "model.safetensors").read_bytes() == (tmp_path / "packed" / "model.safetensors").read_bytes()
    fast = model.generate(**kwargs)
    assert torch.equal(fast.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(plain.scores), atol=1e-5, rtol=1e-5)

    disable_cpu_fast_paths(model)
    assert model.num_parameters() == num_parameters and _same_state(model, state)
    assert model.config._attn_implementation == "sdpa"
    # The original classes come back (the adaLN projections stay RARAdaLNModulation), biases are the same objects.
    assert type(model.model.layers[0].adaln_modulation) is RARAdaLNModulation
    assert all(parameters[name] is p for name, p in model.named_parameters() if name.endswith("bias"))

    # The scoped form, and a model that was enabled before the block stays enabled after it.
    with cpu_fast_paths(model):
        assert isinstance(model.lm_head, PackedLinear)
    assert type(model.lm_head) is torch.nn.Linear
    enable_cpu_fast_paths(model)
    with cpu_fast_paths(model):
        pass
    assert isinstance(model.lm_head, PackedLinear)
    disable_cpu_fast_paths(model)


@needs_onednn
def test_swapping_frees_each_plain_layer_before_packing_the_next(monkeypatch):
    """Packing a model never holds two copies of its weights: each plain layer is gone once it is swapped (RAR-B
    peaked at 2.4 GB instead of 1.4 GB while both copies were alive)."""
    import weakref

    model = tiny_model().eval()
    plain = [weakref.ref(m) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    alive = []
    pack = PackedLinear.__init__

    def counting_init(self, linear, num_rows=None):
        alive.append(sum(ref() is not None for ref in plain))  # before this layer is packed
        pack(self, linear, num_rows)

    monkeypatch.setattr(PackedLinear, "__init__", counting_init)
    assert replace_with_packed_linear(model) == len(plain) > 2
    assert alive == list(range(len(plain), 0, -1))
    assert all(ref() is None for ref in plain)


@needs_onednn
def test_packed_layers_refuse_what_they_cannot_do_in_one_line():
    model = tiny_model()
    enable_cpu_fast_paths(model)
    with pytest.raises(RuntimeError, match=r"inference-only CPU kernel .*disable_cpu_fast_paths"):
        model.train()(input_ids=torch.tensor([[17, 3, 4]]))
    model.eval()
    model.to("cpu")  # a no-op move keeps the packed weights
    assert model.lm_head.packed_weight is not None
    # load_state_dict repacks what it loads; deepcopy keeps the layers working.
    state = _state(model)
    with torch.no_grad():
        model.lm_head.bias.add_(1.0)
    model.load_state_dict(state)
    assert _same_state(model, state)
    clone = copy.deepcopy(model)
    ids = torch.tensor([[17, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    # Cast to a dtype oneDNN does not pack: the layers follow and run F.linear, exactly as the plain model.
    plain = tiny_model().to(torch.float64)
    model.to(torch.float64)
    assert model.lm_head.packed_weight is None and model.lm_head.weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    disable_cpu_fast_paths(model)
    assert _same_state(model, {k: v.to(torch.float64) for k, v in state.items()})
    assert type(model.lm_head) is torch.nn.Linear


def test_weights_that_cannot_be_packed_stay_plain():
    model = tiny_model().to(torch.float64)
    assert not can_pack(model.lm_head.weight)
    assert replace_with_packed_linear(model) == 0 and replace_with_plain_linear(model) == 0


@needs_onednn
def test_compiled_graphs_run_the_packed_product_as_an_opaque_custom_op():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = mlp(x)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    replace_with_packed_linear(mlp)
    compiled = torch.compile(mlp, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    targets = [node.target for node in graphs[-1].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.rar_hf.packed_linear.default) == 2 and F.linear not in targets
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ decoding attention
def _cache_like(dtype, filled=5, slots=9):
    """One new query per row over a static-cache-like key/value tensor whose slots past `filled` hold garbage."""
    torch.manual_seed(0)
    query = torch.randn(3, 4, 1, 16).to(dtype)
    key, value = torch.randn(3, 4, slots, 16).to(dtype), torch.randn(3, 4, slots, 16).to(dtype)
    key[:, :, filled:], value[:, :, filled:] = 1e4, -1e4  # would dominate the result if they were attended
    allowed = torch.zeros(3, 1, 1, slots, dtype=torch.bool)
    allowed[..., :filled] = True
    return query, key, value, allowed


def _exact(query, key, value, filled=5):
    return F.scaled_dot_product_attention(
        query.double(), key[:, :, :filled].double(), value[:, :, :filled].double(), scale=0.25
    ).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "sliced"])
def test_decoding_attention_matches_exact_attention(dtype, mask_kind):
    query, key, value, allowed = _cache_like(dtype)
    exact = _exact(query, key, value)
    if mask_kind == "bool":
        mask = allowed
    elif mask_kind == "additive":
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    else:  # what the attention function passes when it reads only the filled slots
        key, value, mask = key[:, :, :5], value[:, :, :5], None
    output, weights = decoding_attention_forward(None, query, key, value, mask, scaling=0.25)
    assert output.dtype == dtype and output.shape == (3, 1, 4, 16) and weights is None
    # Computed in float32 from the half-precision inputs: only the final rounding to `dtype` remains.
    assert (output.double() - exact).abs().max() <= (exact.abs().max() * torch.finfo(dtype).eps).item() * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filled_slots_attention_reads_only_the_filled_slots(dtype):
    query, key, value, _ = _cache_like(dtype, filled=5, slots=9)
    output = filled_slots_attention(query, key, value, torch.tensor([4]), 0.25)
    assert output.shape == (3, 1, 4, 16) and output.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(output.double(), _exact(query, key, value), atol=tolerance, rtol=1e-2)


def _stepwise_logits(model, sequence):
    """Teacher-forced logits of `sequence` (class token, then image tokens) decoded one token at a time with a
    static cache (which hands attention all its slots, filled or not)."""
    cache = StaticCache(config=model.config, max_cache_len=sequence.shape[1] + 1)
    logits = [model(input_ids=sequence[:, :2], cache=cache, use_cache=True, starts_sequence=True).logits]
    for j in range(2, sequence.shape[1]):
        step = model(input_ids=sequence[:, j : j + 1], condition_ids=sequence[:, 0], cache=cache, use_cache=True,
                     position_ids=torch.tensor([j]), starts_sequence=False)  # fmt: skip
        logits.append(step.logits)
    return torch.cat(logits, dim=1).double()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_attention_runs_every_decoding_step_within_rounding(monkeypatch, dtype):
    model = tiny_model()
    sequence = model.generate(class_labels=[1, 7, None], guidance_scale=3.0, max_new_tokens=10)
    exact = copy.deepcopy(model).double()(input_ids=sequence).logits[:, 2:]
    model = model.to(dtype)
    plain = _stepwise_logits(model, sequence)[:, 2:]
    calls = []
    original = cpu_kernels.decoding_attention_forward if dtype != torch.float32 else cpu_kernels.sdpa_attention_forward
    name = "decoding_attention_forward" if dtype != torch.float32 else "sdpa_attention_forward"

    def counted(module, query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2]))
        return original(module, query, key, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, name, counted)
    model.set_attn_implementation(CPU_ATTENTION)
    fast = _stepwise_logits(model, sequence)[:, 2:]
    # Every one-token step of every layer reads only the filled slots (cls, class, the tokens so far).
    steps = [(1, 4 + j) for j in range(sequence.shape[1] - 2) for _ in range(model.config.num_hidden_layers)]
    assert [c for c in calls if c[0] == 1] == steps
    if dtype == torch.float32:
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    else:  # the float32 products over the bfloat16 cache add no error beyond bfloat16's own
        fast_error, plain_error = (fast - exact).abs().max(), (plain - exact).abs().max()
        assert fast_error <= 1.25 * plain_error, (fast_error, plain_error)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_steps_attend_over_the_filled_slots_or_fused_products(dtype):
    if not can_pack(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
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
        with cpu_fast_paths(model):
            compiled = model.generate(**kwargs, compile_config=compile_config)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1  # the decoding step; no recompilation as the filled length grows
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    # float32: the opaque op over the filled slots; bfloat16: float32 products the compiler fuses with the upcast.
    expected_ops = model.config.num_hidden_layers if dtype == torch.float32 else 0
    assert targets.count(torch.ops.rar_hf.filled_slots_attention.default) == expected_ops
    assert targets.count(torch.ops.rar_hf.packed_linear.default) > 0
    assert F.scaled_dot_product_attention not in targets
    if dtype == torch.float32:
        assert torch.equal(compiled.sequences, eager.sequences)
        torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), atol=1e-5, rtol=1e-5)
    else:  # bfloat16 products round differently: compare the steps before any token differs
        same = (compiled.sequences == eager.sequences).all(dim=0)[1:].long().cumprod(0).sum()
        assert same >= 1
        torch.testing.assert_close(
            torch.stack(compiled.scores[:same]), torch.stack(eager.scores[:same]), atol=5e-2, rtol=5e-2
        )
