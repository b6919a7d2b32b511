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
    inputs = [torch.randn(8, 48), torch.randn(2, 5, 48), torch.randn(8, 96)[:, ::2]]  # 2-D, 3-D, strided
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
def test_packed_copies_are_freed_even_when_the_block_fails():
    model = tiny_model()
    with pytest.raises(KeyError):
        with prepacked_linear_weights(model, num_rows=2):
            assert model.lm_head.packed_weight is not None
            raise KeyError("boom")
    assert all(getattr(m, "packed_weight", None) is None for m in model.modules())


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
    plain = model.generate(**kwargs, prepack_weights=False)
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
def test_no_packing_when_the_copies_would_not_fit_in_memory(monkeypatch, caplog):
    psutil = pytest.importorskip("psutil")
    model = tiny_model()
    num_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, PrepackedLinear))
    available = psutil.virtual_memory()._replace(available=2 * num_bytes - 2)  # just under twice the copies
    monkeypatch.setattr(psutil, "virtual_memory", lambda: available)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), torch.no_grad(), prepacked_linear_weights(model, num_rows=2):
            assert model.lm_head.packed_weight is None
            tokens = model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False)
    finally:
        hf_logging.disable_propagation()
    assert tokens.shape == (2, 17)
    assert "Not prepacking the linear weights" in caplog.text and "half of the available memory" in caplog.text
