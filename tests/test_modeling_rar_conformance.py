"""The contracts every transformers model keeps (outputs, deprecations, loss, generation dicts, compilation), on RAR."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from transformers import CompileConfig
from transformers.cache_utils import DynamicCache

from rar_hf import RARConfig, RARForImageGeneration, RARModel

from test_modeling_rar import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

L, V = 16, 16  # image tokens and codebook of tiny_config()


def token_ids(model, labels=(1, 2), length=5):
    return torch.cat([model.prepare_class_ids(list(labels)), torch.randint(0, V, (len(labels), length))], 1)


# ------------------------------------------------------------------------------------------------ forward outputs
@pytest.mark.parametrize("where", ["argument", "config"])
def test_return_dict_false_returns_tuples(where):
    model = tiny_model()
    ids = token_ids(model)
    labels = ids.clone()
    labels[:, 0] = -100
    expected = model(input_ids=ids, labels=labels, use_cache=False)
    kwargs = {"return_dict": False} if where == "argument" else {}
    if where == "config":
        model.config.return_dict = False
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
        base = model.model(input_ids=ids, use_cache=False, **kwargs)
    assert type(full) is tuple and type(base) is tuple
    loss, logits = full
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(logits, expected.logits)
    assert len(base) == 1 and base[0].shape == (2, ids.shape[1], 32)
    # generate() still gets its dict outputs.
    out = model.generate(class_labels=[1], guidance_scale=1.0, max_new_tokens=3, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 4)


@pytest.mark.parametrize("where", ["argument", "config"])
def test_hidden_states_and_attentions(where):
    model = tiny_model()
    model.set_attn_implementation("eager")
    ids = token_ids(model)
    if where == "argument":
        kwargs = dict(output_hidden_states=True, output_attentions=True)
    else:
        model.config.output_hidden_states = True
        model.config.output_attentions = True
        kwargs = {}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    num_slots = 1 + ids.shape[1]  # the cls slot is counted on a call that starts a sequence
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, num_slots, 32) for h in out.hidden_states)
    # hidden_states[0] are the embeddings: the cls slot first, then the condition with its target-aware term.
    inner = model.model
    cls = inner.cls_token[0, 0] + inner.position_embedding[0]
    torch.testing.assert_close(out.hidden_states[0][:, 0], cls.expand(2, -1))
    # each layer's output is the next layer's input
    condition = inner.embed_tokens(ids[:, 0])[:, None] + inner.condition_position_embedding[:num_slots]
    mask = torch.full((num_slots, num_slots), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        layer_out = inner.layers[0](out.hidden_states[0], condition, attention_mask=mask)
    torch.testing.assert_close(layer_out, out.hidden_states[1])
    assert len(out.attentions) == model.config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (2, 4, num_slots, num_slots)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, num_slots))
        assert attention.triu(1).abs().max() == 0  # causal
    # A continuing (cached) call counts only the slots it runs.
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :3], cache=cache, use_cache=True)
        step = model(input_ids=ids[:, 3:4], condition_ids=ids[:, 0], cache=cache, use_cache=True, **kwargs)
    assert step.hidden_states[0].shape == (2, 1, 32) and step.attentions[0].shape == (2, 4, 1, 5)


def test_sdpa_attentions_behave_as_transformers_models():
    # sdpa computes no weights: transformers' models warn and return an empty tuple; so does RAR.
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out = model(input_ids=token_ids(model), output_attentions=True, output_hidden_states=True)
    assert out.attentions == () and len(out.hidden_states) == 3


def test_past_key_values_is_the_deprecated_name_of_cache():
    model = tiny_model()
    ids = token_ids(model)
    with torch.no_grad():
        for forward in (model, model.model):
            expected_cache = DynamicCache(config=model.config)
            forward(input_ids=ids[:, :3], cache=expected_cache, use_cache=True)
            expected = forward(input_ids=ids[:, 3:], condition_ids=ids[:, 0], cache=expected_cache, use_cache=True)
            cache = DynamicCache(config=model.config)
            with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache` instead"):
                forward(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == 4  # cls, condition, 2 tokens: the cache was used
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                out = forward(input_ids=ids[:, 3:], condition_ids=ids[:, 0], past_key_values=cache, use_cache=True)
            first = out.logits if forward is model else out.last_hidden_state
            reference = expected.logits if forward is model else expected.last_hidden_state
            torch.testing.assert_close(first, reference)


# ----------------------------------------------------------------------------------------------------------- loss
def test_loss_follows_the_causal_lm_contract():
    model = tiny_model()
    ids = token_ids(model, labels=(1, 2, 3, 4), length=L)
    labels = ids.clone()
    labels[:, 0] = -100
    labels[0, 5:9] = -100  # a few ignored tokens make the micro-batches' token counts differ
    logits = model(input_ids=ids).logits
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    expected = per_token.sum() / (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, expected)
    # shift_labels: already aligned with the logits (here: shifted by hand and padded), the same loss.
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(input_ids=ids, shift_labels=shift_labels).loss, expected)
    # num_items_in_batch: micro-batches of unequal token counts sum to the loss of the whole batch.
    num_items = (labels[:, 1:] != -100).sum()
    accumulated = sum(
        model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss for rows in (slice(0, 1), slice(1, 4))
    )
    torch.testing.assert_close(accumulated, expected)


# ------------------------------------------------------------------------------------------------------ generation
def test_prepare_inputs_for_generation_passes_on_what_it_does_not_consume():
    model = tiny_model()
    ids = token_ids(model, length=3)
    cache = DynamicCache(config=model.config)
    inputs = model.prepare_inputs_for_generation(
        ids, cache=cache, output_attentions=True, output_hidden_states=True, my_flag=7, next_sequence_length=1, labels=ids
    )
    assert inputs["output_attentions"] and inputs["output_hidden_states"] and inputs["my_flag"] == 7
    assert "labels" not in inputs and "next_sequence_length" not in inputs
    # Inputs are fresh contiguous tensors, not views of the growing sequence (strides fixed for compiled forwards).
    assert inputs["input_ids"].is_contiguous() and inputs["input_ids"].shape == (2, 1)
    assert inputs["condition_ids"].stride() == (1,) and inputs["condition_ids"].data_ptr() != ids.data_ptr()


def _teacher_forced_log_probs(model, sequences):
    with torch.no_grad():
        logits = model(input_ids=sequences[:, :-1], use_cache=False).logits
    return logits.log_softmax(-1).gather(-1, sequences[:, 1:, None])[..., 0]


@pytest.mark.parametrize("cache", ["static", "dynamic", "no-cache"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_generate_dict_outputs(cache, guidance_scale, do_sample):
    model = tiny_model()
    model.set_attn_implementation("eager")
    batch, layers, steps = 2, model.config.num_hidden_layers, 6
    rows = batch * (2 if guidance_scale != 1.0 else 1)  # the model runs [conditional; null] with guidance
    cache_kwargs = {"no-cache": {"use_cache": False}, "dynamic": {"cache_implementation": "dynamic"}}.get(cache, {})
    out = model.generate(
        class_labels=[1, 2],
        guidance_scale=guidance_scale,
        do_sample=do_sample,
        max_new_tokens=steps,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_hidden_states=True,
        output_attentions=True,
        **cache_kwargs,
    )
    assert out.sequences.shape == (batch, 1 + steps)
    for name in ("scores", "logits", "hidden_states", "attentions"):
        assert len(getattr(out, name)) == steps, name
    for step in range(steps):
        # the slots this step ran: cls + condition at first, then the newest token (the whole sequence without cache)
        new = 2 + step if cache == "no-cache" else (2 if step == 0 else 1)
        # a static cache (sized for the call: cls + class + steps - 1) shows all its slots, masked, as in llama
        kv = 1 + steps if cache == "static" else 2 + step
        assert out.scores[step].shape == (batch, V) and out.logits[step].shape == (rows, V)
        assert len(out.hidden_states[step]) == layers + 1 and len(out.attentions[step]) == layers
        assert all(h.shape == (rows, new, 32) for h in out.hidden_states[step])
        assert all(a.shape == (rows, 4, new, kv) for a in out.attentions[step])
    if not do_sample:
        assert torch.equal(out.sequences[:, 1:], torch.stack(out.scores, 1).argmax(-1))
    if guidance_scale == 1.0:
        # unguided scores are the model's own log-probabilities of the sequence, up to a per-row constant
        teacher = _teacher_forced_log_probs(model, out.sequences)
        drawn = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, out.sequences[:, 1:, None])[..., 0]
        torch.testing.assert_close(drawn, teacher, atol=1e-5, rtol=0)


def test_beam_search_without_guidance_and_a_clear_error_with_it():
    model = tiny_model()
    out = model.generate(
        class_labels=[1, 2],
        guidance_scale=1.0,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (4, 1 + L)
    # with length_penalty=0 a beam's score is the sum of its tokens' log-probabilities under the model
    teacher = _teacher_forced_log_probs(model, out.sequences).sum(-1)
    torch.testing.assert_close(out.sequences_scores, teacher, atol=1e-4, rtol=0)
    greedy = model.generate(class_labels=[1, 2], guidance_scale=1.0, do_sample=False)
    assert (out.sequences_scores[::2] >= _teacher_forced_log_probs(model, greedy).sum(-1) - 1e-4).all()
    with pytest.raises(ValueError, match="Beam search .* cannot run with classifier-free guidance"):
        model.generate(class_labels=[1], guidance_scale=2.0, num_beams=2, do_sample=False)


def test_token_counts_beyond_the_image_are_rejected_and_fewer_give_partial_sequences(monkeypatch):
    model = tiny_model()
    calls = []
    monkeypatch.setattr(RARModel, "forward", lambda *a, **k: calls.append(1))
    for kwargs in ({"max_new_tokens": L + 1}, {"min_new_tokens": L + 4}, {"max_length": L + 2}):
        name = next(iter(kwargs)).replace("length", "new_tokens")
        with pytest.raises(ValueError, match=f"{name}={L + 1 if 'max' in name else L + 4} .* image_seq_len={L}"):
            model.generate(class_labels=[1], **kwargs)
    assert not calls  # rejected before any compute
    monkeypatch.undo()
    torch.manual_seed(0)
    full = model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False)
    partial = model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, max_new_tokens=5)
    assert torch.equal(partial, full[:, :6])
    # In another order, the positions not generated are -1 (the raster layout of what was generated).
    orders = torch.stack([torch.randperm(L) for _ in range(2)])
    full = model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, orders=orders)
    partial = model.generate(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, orders=orders, max_new_tokens=5)
    generated = torch.zeros(2, L, dtype=torch.bool).scatter_(1, orders[:, :5], True)
    assert torch.equal(partial[:, 1:][generated], full[:, 1:][generated]) and (partial[:, 1:][~generated] == -1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"assistant_model": "not a model"}, "assistant_model must be a RARForImageGeneration"),
    ],
)
def test_decoding_strategies_that_do_not_apply_get_clear_errors(kwargs, message):
    model = tiny_model()
    kwargs = {k: (model if v == "self" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        model.generate(class_labels=[1, 2], **kwargs)


# ----------------------------------------------------------------------------------------------- config, vocabulary
def test_vocabulary_cannot_be_resized_and_use_cache_is_kept(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="vocabulary cannot be resized: its ids are the image tokenizer's codebook"):
        model.resize_token_embeddings(100)
    config = tiny_config(use_cache=False)
    assert config.use_cache is False
    config.save_pretrained(tmp_path)
    assert RARConfig.from_pretrained(tmp_path).use_cache is False
    # the config's use_cache is the forward's default, as in transformers' models
    model = RARForImageGeneration(config).eval()
    with torch.no_grad():
        assert model(input_ids=token_ids(model)).cache is None
        assert isinstance(model(input_ids=token_ids(model), use_cache=True).cache, DynamicCache)


# -------------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0], ids=["no-guidance", "guidance"])
def test_compiled_decoding_never_recompiles(guidance_scale):
    model = tiny_model()
    kwargs = dict(class_labels=[1, 2], guidance_scale=guidance_scale, do_sample=False, cache_implementation="static")
    eager = model.generate(**kwargs, disable_compile=True)

    # transformers' automatic path: prefill eager, every decoding step through one compiled graph.
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # CPU: the automatic compilation is opt-in there
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(model.generate(**kwargs, compile_config=compile_config), eager)
    assert counters["stats"]["unique_graphs"] == 1  # L - 1 decoding steps, one graph, no recompilation

    # the whole forward compiled by the user: one graph for the prefill, one for the decoding steps.
    counter = CompileCounter()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
    assert torch.equal(model.generate(**kwargs), eager)
    assert counter.frame_count == 2
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ generation config
def test_generation_config_is_the_one_source_of_sampling_defaults_and_legacy_folders_load(tmp_path):
    import json

    model = tiny_model(sampling_defaults=dict(guidance_scale=3.0, guidance_scale_pow=1.0, temperature=0.9))
    config = model.generation_config
    assert (config.guidance_scale, config.guidance_scale_pow, config.guidance_schedule, config.temperature) == (
        3.0, 1.0, "pow-cosine", 0.9
    )  # fmt: skip
    model.save_pretrained(tmp_path / "new")
    assert "sampling_defaults" not in json.loads((tmp_path / "new" / "config.json").read_text())
    saved = json.loads((tmp_path / "new" / "generation_config.json").read_text())
    assert (saved["guidance_scale"], saved["guidance_scale_pow"], saved["temperature"]) == (3.0, 1.0, 0.9)
    # generate() reads them: the saved defaults equal passing them explicitly, and a call's own value wins.
    reloaded = RARForImageGeneration.from_pretrained(tmp_path / "new")
    explicit = dict(guidance_scale=3.0, guidance_scale_pow=1.0, do_sample=False)
    assert torch.equal(reloaded.generate(class_labels=[1], do_sample=False), model.generate(class_labels=[1], **explicit))
    assert not torch.equal(
        reloaded.generate(class_labels=[1], do_sample=False, guidance_scale=1.0), reloaded.generate(class_labels=[1], do_sample=False)
    )
    # A folder written before: sampling_defaults in config.json, an old generation_config.json without them.
    old = tmp_path / "old"
    model.save_pretrained(old)
    config_json = json.loads((old / "config.json").read_text())
    config_json["sampling_defaults"] = {"guidance_scale": 4.0, "guidance_scale_pow": 2.0, "temperature": 1.05}
    (old / "config.json").write_text(json.dumps(config_json))
    (old / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "max_new_tokens": L, "min_new_tokens": L, "temperature": 1.05, "top_k": 0}
    ))  # fmt: skip
    legacy = RARForImageGeneration.from_pretrained(old)
    config = legacy.generation_config
    assert (config.guidance_scale, config.guidance_scale_pow, config.temperature) == (4.0, 2.0, 1.05)
    assert config.max_new_tokens is None  # "a whole image" is what an empty prompt leaves anyway
    legacy.save_pretrained(tmp_path / "migrated")
    assert "sampling_defaults" not in json.loads((tmp_path / "migrated" / "config.json").read_text())
    assert json.loads((tmp_path / "migrated" / "generation_config.json").read_text())["guidance_scale"] == 4.0


def test_one_class_label_rule_and_no_padding():
    model = tiny_model()
    null = model.config.null_class_id
    assert model.prepare_class_ids([None, -1, "none", "Unconditional", 3]).flatten().tolist() == [null] * 4 + [20]
    with pytest.raises(ValueError, match="Class label 'cat' is out of range.*'none' or 'unconditional'"):
        model.prepare_class_ids(["cat"])
    ids = token_ids(model)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, plain)
        padded = torch.ones_like(ids)
        padded[0, :2] = 0
        with pytest.raises(ValueError, match="RAR does not take a padding attention_mask"):
            model(input_ids=ids, attention_mask=padded)
    with pytest.raises(ValueError, match="RAR does not take a padding attention_mask"):
        model.generate(ids, attention_mask=padded)
    assert model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False).shape == (2, 1 + L)


def test_continuing_from_a_cache_checks_it_fits():
    model = tiny_model()
    kwargs = dict(guidance_scale=2.0, do_sample=False)
    full = model.generate(class_labels=[1, 2], **kwargs)
    first = model.generate(class_labels=[1, 2], **kwargs, max_new_tokens=4, return_dict_in_generate=True,
                           cache_implementation="dynamic")  # fmt: skip
    assert torch.equal(model.generate(first.sequences, cache=first.cache, **kwargs), full)
    fresh = tiny_model()  # a static cache sized for 4 tokens (no earlier, larger call on this model)
    small = fresh.generate(class_labels=[1, 2], **kwargs, max_new_tokens=4, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="static cache has room for 5 slots but this call needs 17.*max_cache_len"):
        fresh.generate(small.sequences, cache=small.cache, **kwargs)
    with pytest.raises(ValueError, match="The cache holds 4 rows but this call runs 2"):
        fresh.generate(small.sequences[:1], cache=small.cache, **kwargs)
