import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from rar_hf import RARConfig, RARForImageGeneration, guidance_scales
from rar_hf.convert import rar_from_official_checkpoint
from rar_hf.generation_rar import NonFiniteLogitsError, RARClassifierFreeGuidanceLogitsProcessor, RARFiniteLogitsCheck



def tiny_config(**kwargs):
    defaults = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        codebook_size=16,
        num_classes=10,
        image_seq_len=16,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return RARConfig(**{**defaults, **kwargs})


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = RARForImageGeneration(tiny_config(**kwargs)).eval()
    # adaLN-zero makes a fresh model ignore its blocks: randomise everything so tests see real computation.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def reference(rar_fixture_dir):
    model = rar_from_official_checkpoint(rar_fixture_dir / "generator.bin")
    return model, load_file(str(rar_fixture_dir / "cases.safetensors"))


def class_ids(model, cases):
    return model.prepare_class_ids(cases["class_labels"])


def layout(model):
    """`(V, C, L)`: codebook size, number of classes and image tokens of a fixture generator."""
    return model.config.codebook_size, model.config.num_classes, model.config.image_seq_len


def guided_probs(model, ids, scales, temperature):
    """Teacher-forced guided distribution for every step along `ids` (B, 1 + L) through the generate() helpers."""
    inputs = model.prepare_inputs_for_generation(ids[:, :-1], cache=None, guidance=True)
    logits = model(input_ids=inputs["input_ids"], condition_ids=inputs["condition_ids"]).logits
    processor = RARClassifierFreeGuidanceLogitsProcessor(scales)
    steps = [processor(ids[:, : 1 + s], logits[:, s]) for s in range(ids.shape[1] - 1)]
    return torch.softmax(torch.stack(steps, 1) / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def test_training_forward_and_loss_match_official(reference):
    model, cases = reference
    _, _, L = layout(model)
    orders = cases["orders"]
    permuted = cases["tokens"].gather(1, orders)
    input_ids = torch.cat([class_ids(model, cases), permuted], 1)
    labels = input_ids.clone()
    labels[:, 0] = -100
    out = model(input_ids=input_ids, orders=orders, labels=labels)
    diff = (out.logits - cases["train_logits"]).abs().max().item()
    print(f"train_logits max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert torch.equal(labels[:, 1:], cases["train_labels"])
    official_loss = torch.nn.functional.cross_entropy(cases["train_logits"][:, :L].flatten(0, 1), cases["train_labels"].flatten())
    assert abs(out.loss.item() - official_loss.item()) < 1e-5


@torch.no_grad()
def test_unconditional_and_prefix_logits_match_official(reference):
    model, cases = reference
    null = torch.full((3, 1), model.config.null_class_id)
    diff = (model(input_ids=torch.cat([null, cases["tokens"]], 1)).logits - cases["uncond_logits"]).abs().max().item()
    print(f"uncond_logits max abs diff {diff:.3g}")
    assert diff < 1e-5
    n = int(cases["prefix_len"])
    prefix = torch.cat([class_ids(model, cases), cases["tokens"][:, :n]], 1)
    diff = (model(input_ids=prefix).logits - cases["prefix_logits"]).abs().max().item()
    print(f"prefix_logits max abs diff {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_kv_cached_steps_match_official(reference, cache_kind):
    model, cases = reference
    _, _, L = layout(model)
    cond = class_ids(model, cases)
    if cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=L + 1)
    steps = [model(input_ids=cond, cache=cache, use_cache=True).logits[:, -1]]
    for s in range(1, L):
        token = cases["tokens"][:, s - 1 : s]
        steps.append(model(input_ids=token, condition_ids=cond[:, 0], cache=cache, use_cache=True).logits[:, -1])
    diff = (torch.stack(steps, 1) - cases["kv_step_logits"]).abs().max().item()
    print(f"kv_step_logits ({cache_kind}) max abs diff {diff:.3g}")
    assert diff < 1e-5


def test_eager_attention_matches_sdpa(reference):
    model, cases = reference
    ids = torch.cat([class_ids(model, cases), cases["tokens"][:, : layout(model)[2] * 2 // 3]], 1)
    with torch.no_grad():
        sdpa = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        try:
            eager = model(input_ids=ids).logits
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_guidance_schedule_matches_official(reference):
    model, cases = reference
    _, _, L = layout(model)
    scales = guidance_scales(L, float(cases["guidance_scale"]), "pow-cosine", float(cases["guidance_scale_pow"]))
    assert torch.equal(scales, cases["cfg_scale"])
    assert guidance_scales(4, 3.0, "linear").tolist() == [1.0, 1.5, 2.0, 2.5]
    assert guidance_scales(3, 3.0, "constant").tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="Unknown guidance schedule 'cosine'"):
        guidance_scales(3, 3.0, "cosine")


@torch.no_grad()
def test_teacher_forced_guided_distribution_matches_cfg_probs(reference):
    model, cases = reference
    ids = torch.cat([class_ids(model, cases), cases["tokens"]], 1)
    probs = guided_probs(model, ids, cases["cfg_scale"], cases["temperature"])
    diff = (probs - cases["cfg_probs"]).abs().max().item()
    print(f"cfg_probs max abs diff {diff:.3g}")
    assert diff < 1e-7  # the fixture README: 1e-7 on probabilities is comfortable


@torch.no_grad()
def test_generate_reproduces_official_samples_bit_exactly(reference):
    model, cases = reference
    V, _, L = layout(model)
    torch.manual_seed(int(cases["sample_seed"]))
    torch.rand(3)  # the official sampler draws its (p = 0) label-dropout mask first
    out = model.generate(
        class_labels=cases["class_labels"],
        guidance_scale=float(cases["guidance_scale"]),
        guidance_scale_pow=float(cases["guidance_scale_pow"]),
        temperature=float(cases["temperature"]),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert torch.equal(out.sequences[:, 1:], cases["sample_tokens"])
    assert torch.equal(out.sequences[:, :1], class_ids(model, cases))
    # scores: the guided, temperature-scaled rows the tokens were drawn from; logits: the raw doubled batch.
    assert len(out.scores) == L and out.scores[0].shape == (3, V) and out.logits[0].shape == (6, V)
    probs = guided_probs(model, out.sequences, cases["cfg_scale"], cases["temperature"])
    torch.testing.assert_close(torch.softmax(torch.stack(out.scores, 1), -1), probs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- generate()
@pytest.mark.parametrize("cache_kwargs", [{"use_cache": False}, {"cache_implementation": "static"}])
def test_cache_kinds_give_the_same_distributions(cache_kwargs):
    model = tiny_model()
    kwargs = dict(class_labels=[1, 7, None], guidance_scale=3.0, guidance_scale_pow=1.0, do_sample=False)
    kwargs.update(return_dict_in_generate=True, output_scores=True)
    dynamic = model.generate(**kwargs)
    other = model.generate(**kwargs, **cache_kwargs)
    assert torch.equal(dynamic.sequences, other.sequences)
    torch.testing.assert_close(torch.stack(dynamic.scores), torch.stack(other.scores), atol=1e-5, rtol=0)


def test_generate_without_guidance_and_with_top_k():
    model = tiny_model()
    torch.manual_seed(0)
    out = model.generate(class_labels=[3, 4], guidance_scale=1.0, top_k=2, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2, 17)
    assert out.logits is None or out.logits[0].shape[0] == 2
    # top_k=2 leaves two finite scores per step, and the chosen token is one of them
    for step, scores in enumerate(out.scores):
        assert int(torch.isfinite(scores).sum(-1).max()) == 2
        assert torch.isfinite(scores.gather(1, out.sequences[:, 1 + step, None])).all()


@pytest.mark.parametrize("order_kind", ["random", "spiral_in", "tensor"])
def test_generation_in_other_orders_returns_raster_tokens(order_kind):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    orders = torch.stack([torch.randperm(16, generator=g) for _ in range(2)])
    if order_kind == "tensor":
        order_arg = orders
    else:
        order_arg = order_kind
        torch.manual_seed(5)
        if order_kind == "random":
            orders = torch.stack([torch.randperm(16) for _ in range(2)])
        else:
            from rar_hf.data.scan_orders import get_scan_order

            orders = get_scan_order("spiral_in", 4, 4).expand(2, -1)
    torch.manual_seed(5)
    sequences = model.generate(class_labels=[2, 5], guidance_scale=1.0, do_sample=False, orders=order_arg)
    # Greedy decoding in an order == argmax of a teacher-forced pass in that order on the un-permuted result.
    permuted = sequences[:, 1:].gather(1, orders)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([sequences[:, :1], permuted], 1), orders=orders).logits
    assert torch.equal(logits[:, :-1].argmax(-1), permuted)


def test_fold_target_aware_position_embedding_keeps_raster_logits(tmp_path):
    model = tiny_model()
    ids = torch.cat([model.prepare_class_ids([1, 2]), torch.randint(0, 16, (2, 16))], 1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        n_params = sum(p.numel() for p in model.parameters())
        model.fold_target_aware_position_embedding()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == n_params - 18 * 32
    with pytest.raises(ValueError, match="folded"):
        model(input_ids=ids, orders=torch.randperm(16).expand(2, -1))
    model.save_pretrained(tmp_path)
    reloaded = RARForImageGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.target_aware_position_embedding_folded
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- generate(): arguments
def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(orders="random"), dict(orders="random", do_sample=False), dict(top_k=5, top_p=0.9, temperature=0.8)],
    ids=["sampling", "random-orders", "random-orders-greedy", "warpers"],
)
def test_generator_controls_every_random_draw(options):
    model = tiny_model()
    kwargs = dict(class_labels=[1, 7, None], guidance_scale=3.0, guidance_scale_pow=1.0, **options)
    torch.manual_seed(1)
    first = model.generate(generator=seeded(0), **kwargs)
    torch.manual_seed(2)  # whatever the global RNG does in between
    torch.rand(1000)
    again = model.generate(generator=seeded(0), **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, model.generate(generator=seeded(1), **kwargs))


def test_generator_list_makes_each_row_independent_of_the_batch():
    model = tiny_model()
    kwargs = dict(guidance_scale=2.0, guidance_scale_pow=1.0, orders="random")
    batch = model.generate(class_labels=[1, 7, 3], generator=[seeded(10), seeded(11), seeded(12)], **kwargs)
    alone = model.generate(class_labels=[7], generator=[seeded(11)], **kwargs)
    assert torch.equal(batch[1:2], alone)


def test_seeded_scores_are_the_distributions_drawn_from():
    model = tiny_model()
    out = model.generate(class_labels=[3, 4], guidance_scale=1.0, top_k=2, generator=seeded(0),
                         return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert len(out.scores) == 16
    for step, scores in enumerate(out.scores):  # two finite scores (top_k=2), not a one-hot row
        assert torch.isfinite(scores).sum(-1).eq(2).all()
        assert torch.isfinite(scores.gather(1, out.sequences[:, 1 + step, None])).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number >= 0, got nan"),
        (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale must be a finite number >= 0, got -1.0"),
        (dict(guidance_scale="3"), TypeError, "guidance_scale must be a number"),
        (dict(guidance_scale_pow=float("nan")), ValueError, "guidance_scale_pow must be a finite number"),
        (dict(guidance_scale_pow=-0.5), ValueError, "guidance_scale_pow must be a finite number >= 0"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), ValueError, "top_k must be a finite number >= 0, got -1"),
        (dict(generator=123), TypeError, "generator must be a torch.Generator or a list of them"),
        (dict(generator=[seeded(0)]), ValueError, "1 generators for a batch of 2"),
        (dict(guidance_scale=1.0, guidance_schedule="cosine"), ValueError, "Unknown guidance schedule 'cosine'"),
    ],
)
def test_bad_sampling_arguments_fail_clearly(kwargs, error, message):
    model = tiny_model()
    with pytest.raises(error, match=message):
        model.generate(class_labels=[1, 2], **kwargs)


def test_non_finite_logits_raise_an_error_naming_the_cause():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.bias[3] = float("nan")  # e.g. a corrupted checkpoint
    for options in (dict(), dict(generator=seeded(0)), dict(do_sample=False), dict(guidance_scale=1.0)):
        with pytest.raises(NonFiniteLogitsError, match=r"non-finite logits.*image token 0.*weights.*float16"):
            model.generate(class_labels=[1, 2], guidance_scale_pow=1.0, **{"guidance_scale": 3.0, **options})
    # On an accelerator the check only folds a device flag per step and raises once, after the loop.
    check = RARFiniteLogitsCheck(defer=True)
    scores = torch.zeros(2, 4)
    check(None, scores)
    check.raise_if_non_finite()
    scores[1, 2] = float("inf")
    assert check(None, scores) is scores
    check(None, torch.zeros(2, 4))
    with pytest.raises(NonFiniteLogitsError, match="dtype"):
        check.raise_if_non_finite()


def test_numpy_integers_are_class_labels():
    model = tiny_model()
    expected = model.prepare_class_ids([3, None, 0])
    assert torch.equal(model.prepare_class_ids([np.int64(3), np.int32(-1), np.uint8(0)]), expected)
    assert torch.equal(model.prepare_class_ids(np.array([3, -1, 0])), expected)
    assert torch.equal(model.prepare_class_ids(np.int64(3)), expected[:1])
    with pytest.raises(ValueError, match=r"Class label 10 is out of range"):
        model.prepare_class_ids([np.int64(10)])
    tokens = model.generate(class_labels=np.array([3, 5]), generator=seeded(0))
    assert torch.equal(tokens, model.generate(class_labels=[3, 5], generator=seeded(0)))


def test_partial_checkpoints_load_as_in_transformers_and_untrustworthy_ones_are_refused(tmp_path, caplog):
    import json

    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # A config with one more layer than the weights: transformers' warning, the new layer initialised (adaLN-zero).
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    loaded, info = RARForImageGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"])[0].startswith("model.layers.2.") and len(info["missing_keys"]) == 18
    assert loaded.model.layers[2].adaln_modulation.weight.abs().max() == 0
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # A base-model (RARModel) checkpoint into the generation class: the head is initialised, the rest loaded.
    model.model.save_pretrained(tmp_path / "base")
    loaded, info = RARForImageGeneration.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["lm_head.bias", "lm_head.weight"]
    assert torch.equal(loaded.model.position_embedding, model.model.position_embedding)
    # Shapes that do not match the config: one line naming a tensor.
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"do not match its config: .* has shape \(\d+, 32\) in the checkpoint"):
        RARForImageGeneration.from_pretrained(tmp_path)
    # NaN weights: refused, naming the tensor.
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.1.mlp.fc2.bias"][3] = float("nan")
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or inf values \(first in model\.layers\.1\.mlp\.fc2\.bias\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # Pickle-format weights: refused before anything is unpickled.
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"lm_head.bias": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds pickle-format weights but no model.safetensors"):
        RARForImageGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_safetensors=False would load pickle-format weights"):
        RARForImageGeneration.from_pretrained(tmp_path, use_safetensors=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ training
def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model()
    model.train()
    ids = torch.cat([model.prepare_class_ids([1, 2]), torch.randint(0, 16, (2, 16))], 1)
    labels = ids.clone()
    labels[:, 0] = -100

    def loss_and_grad():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].mlp.fc1.weight.grad.clone()

    plain = loss_and_grad()
    model.activation_checkpointing_enable()
    checkpointed = loss_and_grad()
    torch.testing.assert_close(plain[0], checkpointed[0])
    torch.testing.assert_close(plain[1], checkpointed[1])


def test_official_initialisation():
    torch.manual_seed(0)
    model = RARForImageGeneration(tiny_config(hidden_size=64, intermediate_size=128))
    for layer in model.model.layers:
        assert layer.adaln_modulation.weight.abs().max() == 0 and layer.adaln_modulation.bias.abs().max() == 0
    assert model.model.final_adaln_modulation.weight.abs().max() == 0
    fc1 = model.model.layers[0].mlp.fc1.weight
    # trunc_normal_(std=0.02) with torch's default absolute bounds (+-2), as the official code
    assert 0.018 < fc1.std() < 0.022 and fc1.mean().abs() < 0.002
    assert model.lm_head.bias.abs().max() == 0
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert model.model.position_embedding.std() > 0.01


def test_presets_and_auto_classes(tmp_path):
    config = RARConfig.from_preset("rar-xl")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        1280,
        32,
        16,
        5120,
    )
    assert "sampling_defaults" not in config.to_dict() and "legacy_sampling_defaults" not in config.to_dict()
    with torch.device("meta"):
        generation_config = RARForImageGeneration(config).generation_config
    assert (generation_config.guidance_scale, generation_config.guidance_scale_pow, generation_config.temperature) == (
        6.9, 1.5, 1.02
    )  # fmt: skip
    with torch.device("meta"):
        n_b = sum(p.numel() for p in RARForImageGeneration(RARConfig.from_preset("B")).parameters())
    assert 255e6 < n_b < 265e6  # paper: 261M (its position tables carry ~1.7M unused rows)
    with pytest.raises(ValueError, match="Unknown RAR preset 's'; expected one of"):
        RARConfig.from_preset("s")
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is RARConfig
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, RARForImageGeneration)
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Class label 10 is out of range: expected an int in \[0, 10\)"):
        model.prepare_class_ids([3, 10])
    with pytest.raises(ValueError, match=r"Class label -5"):
        model.generate(class_labels=[-5])
    good = torch.cat([model.prepare_class_ids([1]), torch.randint(0, 16, (1, 16))], 1)
    bad_token = good.clone()
    bad_token[0, 3] = 16
    with pytest.raises(ValueError, match=r"Image token 16 is out of range: expected ids in \[0, 16\)"):
        model(input_ids=bad_token)
    bad_class = good.clone()
    bad_class[0, 0] = 5
    with pytest.raises(ValueError, match=r"input_ids\[:, 0\] must be a class token in \[17, 27\].*got 5"):
        model(input_ids=bad_class)
    with pytest.raises(ValueError, match="holds 17 image tokens.*image_seq_len=16"):
        model(input_ids=torch.cat([good, good[:, -1:]], 1))
    with pytest.raises(ValueError, match=r"orders must have shape \(1, 16\)"):
        model(input_ids=good, orders=torch.arange(15)[None])
    with pytest.raises(ValueError, match="permutation"):
        model(input_ids=good, orders=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="Unknown scan order|unknown scan order"):
        model.generate(class_labels=[1], orders="diagonal")
