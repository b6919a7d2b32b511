import pytest
import torch
import torch.nn.functional as F

from rar_hf import prepacked_linear_weights
from rar_hf.prepacked_linear import PrepackedLinear, can_prepack

from test_modeling_rar import tiny_model


needs_onednn = pytest.mark.skipif(
    not can_prepack(torch.zeros(1)), reason="this torch build cannot pack float32 weights with oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_matches_f_linear(bias):
    torch.manual_seed(0)
    layer = PrepackedLinear(48, 80, bias=bias)
    # 2-D, 3-D, strided, and 1-3 rows (padded to 8 rows inside)
    inputs = [torch.randn(8, 48), torch.randn(2, 5, 48), torch.randn(8, 96)[:, ::2], torch.randn(1, 48), torch.randn(3, 1, 48)]
    with torch.no_grad(), prepacked_linear_weights(layer, num_rows=8):
        assert layer.packed_weight is not None
        for x in inputs:
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert layer.packed_weight is None


@needs_onednn
def test_training_ignores_the_packed_copy():
    torch.manual_seed(0)
    layer = PrepackedLinear(16, 8)
    x = torch.randn(4, 16)
    with prepacked_linear_weights(layer, num_rows=4):
        layer(x).square().sum().backward()  # grad mode: must go through F.linear to reach the parameters
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@needs_onednn
def test_plain_weights_are_restored_even_when_the_block_fails():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError):
        with prepacked_linear_weights(model, num_rows=2):
            assert model.lm_head.packed_weight is not None and model.lm_head._parameters["weight"].numel() == 0
            raise KeyError("boom")
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_with_and_without_packed_weights_agree(dtype):
    if not can_prepack(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    model = tiny_model().to(dtype)
    used_packed = []
    model.lm_head.register_forward_hook(lambda m, args, out: used_packed.append(m.packed_weight is not None))
    kwargs = dict(class_labels=[1, 7, None], guidance_scale=3.0, do_sample=False)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    packed = model.generate(**kwargs)
    assert used_packed and all(used_packed)
    used_packed.clear()
    plain = model.generate(**kwargs, prepack_weights=False)  # restores the plain weights
    assert used_packed and not any(used_packed)
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.stack(packed.scores), torch.stack(plain.scores), atol=tolerance, rtol=tolerance)
    if dtype == torch.float32:
        assert torch.equal(packed.sequences, plain.sequences)


def test_weights_that_cannot_be_packed_use_f_linear():
    layer = PrepackedLinear(8, 4).to(torch.float64)
    assert not can_prepack(layer.weight)
    with torch.no_grad(), prepacked_linear_weights(layer, num_rows=2):
        assert layer.packed_weight is None
        x = torch.randn(2, 8, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_an_outer_block_packs_once_for_several_generate_calls():
    model = tiny_model()
    with torch.no_grad(), prepacked_linear_weights(model, num_rows=4):
        packed = model.lm_head.packed_weight
        assert packed is not None
        for labels in ([1, 2], [3, None]):
            model.generate(class_labels=labels, guidance_scale=2.0, do_sample=False)
            assert model.lm_head.packed_weight is packed  # neither re-packed nor released by generate()
    assert model.lm_head.packed_weight is None


@needs_onednn
def test_keeping_both_copies_is_skipped_when_they_would_not_fit_in_memory(monkeypatch, caplog):
    psutil = pytest.importorskip("psutil")
    model = tiny_model()
    num_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, PrepackedLinear))
    available = psutil.virtual_memory()._replace(available=2 * num_bytes - 2)  # just under twice the copies
    monkeypatch.setattr(psutil, "virtual_memory", lambda: available)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), torch.no_grad():
            with prepacked_linear_weights(model, num_rows=2, release=False):
                assert model.lm_head.packed_weight is None
            # Replacing the weights needs no extra memory: packed despite the same figure.
            with prepacked_linear_weights(model, num_rows=2):
                assert model.lm_head.packed_weight is not None
    finally:
        hf_logging.disable_propagation()
    assert "Not prepacking the linear weights" in caplog.text and "half of the available memory" in caplog.text


def _plain_weights(model):
    return {n: m._parameters["weight"] for n, m in model.named_modules() if isinstance(m, PrepackedLinear)}


@needs_onednn
def test_generate_replaces_the_weights_by_packed_ones_and_keeps_the_state_dict(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "before")
    parameters = dict(model.named_parameters())
    tokens = model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False)
    # One copy of the weights: the packed one (the parameters are the same objects, now empty).
    assert all(w.numel() == 0 for w in _plain_weights(model).values())
    assert all(parameters[name] is p for name, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(w.numel() == 0 for w in _plain_weights(model).values())  # state_dict() did not unpack
    model.save_pretrained(tmp_path / "after")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    # The next call reuses the packed weights (same tensor) and samples the same tokens.
    packed = model.lm_head.packed_weight
    assert torch.equal(model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False), tokens)
    assert model.lm_head.packed_weight is packed
    # Reading one weight restores that layer only, bit for bit.
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"]) and model.lm_head.packed_weight is None
    assert model.model.layers[0].mlp.fc1.packed_weight is not None
    model.train()
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(parameters[name] is p for name, p in model.named_parameters())


@needs_onednn
@pytest.mark.parametrize("restore", ["to", "load_state_dict", "grad_forward", "unpack", "deepcopy"])
def test_whatever_needs_the_plain_weights_gets_them_back(restore):
    import copy

    from rar_hf import pack_linear_weights, unpack_linear_weights

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_linear_weights(model, num_rows=4) == len(_plain_weights(model))
    if restore == "to":
        model.to(torch.float64)
        before = {k: v.to(torch.float64) for k, v in before.items()}
    elif restore == "load_state_dict":
        model.load_state_dict(before)
    elif restore == "grad_forward":
        ids = torch.tensor([[17, 3, 4]])
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(w.grad is not None for w in _plain_weights(model).values())
    elif restore == "unpack":
        unpack_linear_weights(model)
    else:
        model = copy.deepcopy(model)
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_onednn
def test_compiled_graphs_run_the_packed_product_as_an_opaque_custom_op():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(PrepackedLinear(16, 32), torch.nn.GELU(), PrepackedLinear(32, 8)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = mlp(x)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(mlp, backend=recording_backend, fullgraph=True)
    with torch.no_grad(), prepacked_linear_weights(mlp, num_rows=8):
        out = compiled(x)
        # The weights were released: only the custom op (which finds the packed weight by key) can have run.
        assert mlp[0]._parameters["weight"].numel() == 0
    targets = [node.target for node in graphs[-1].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.rar_hf.packed_linear.default) == 2
    assert F.linear not in targets
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # unpacked again: the plain graph
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    assert F.linear in [node.target for node in graphs[-1].graph.nodes]
