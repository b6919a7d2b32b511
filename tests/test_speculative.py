"""Speculative decoding (draft model, Jacobi) samples exactly what plain sampling samples, and greedy is unchanged."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from rar_hf import RARConfig, RARForImageGeneration, guidance_scales
from rar_hf.speculative_rar import SpeculativeStats

# A tiny token space so that the joint distribution of a whole image (CODES ** LENGTH outcomes) can be enumerated.
CODES, LENGTH, CLASS = 4, 3, 1
SAMPLING = dict(guidance_scale=2.5, guidance_schedule="linear", temperature=0.8)


def random_rar(seed, num_layers, codebook_size=CODES, image_seq_len=LENGTH, scale=0.25):
    torch.manual_seed(seed)
    config = RARConfig(
        hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=32,
        codebook_size=codebook_size, num_classes=3, image_seq_len=image_seq_len, latent_size=[1, image_seq_len],
        dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = RARForImageGeneration(config).eval()
    with torch.no_grad():  # adaLN-zero would make a fresh model ignore its blocks
        for p in model.parameters():
            p.normal_(0, scale)
    return model


@pytest.fixture(scope="module")
def models(one_thread):
    return random_rar(0, num_layers=2), random_rar(1, num_layers=1)


def exact_distribution(model, guidance_scale, guidance_schedule, temperature):
    """P(image) of plain guided sampling for every image, by teacher forcing (no cache, no generate())."""
    codes, length = model.config.codebook_size, model.config.image_seq_len
    images = torch.tensor(list(itertools.product(range(codes), repeat=length)))
    cond = model.prepare_class_ids([CLASS] * len(images))
    null = model.prepare_class_ids([None] * len(images))
    with torch.no_grad():
        c = model(torch.cat([cond, images], 1)).logits[:, :-1]
        u = model(torch.cat([null, images], 1)).logits[:, :-1]
    scales = guidance_scales(length, guidance_scale, guidance_schedule)[None, :, None]
    log_p = torch.log_softmax((u + (c - u) * scales) / temperature, dim=-1)
    return log_p.gather(-1, images[..., None]).squeeze(-1).sum(-1).exp().double()


def sample_counts(model, num_images, batch_size=1, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    codes, length = model.config.codebook_size, model.config.image_seq_len
    counts = torch.zeros(codes**length, dtype=torch.long)
    weights = codes ** torch.arange(length - 1, -1, -1)
    for _ in range(num_images // batch_size):
        ids = model.prepare_class_ids([CLASS] * batch_size)
        out = model.generate(ids, generator=generator, **SAMPLING, **kwargs)
        counts += torch.bincount((out[:, 1:] * weights).sum(1), minlength=codes**length)
    return counts


def chi_square_p_value(counts, probs):
    expected = probs / probs.sum() * counts.sum()
    # Cells expected below 5 are pooled into one, as the chi-square approximation needs.
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize(
    "method",
    [dict(jacobi_window=2), dict(assistant=True, num_assistant_tokens=2), dict(jacobi_window=3, batch_size=4)],
    ids=["jacobi", "draft-model", "jacobi-batch4"],
)  # fmt: skip
def test_speculative_sampling_matches_the_guided_distribution(models, method):
    target, draft = models
    method = dict(method)
    batch_size = method.pop("batch_size", 1)
    if method.pop("assistant", False):
        method["assistant_model"] = draft
    probs = exact_distribution(target, **SAMPLING)
    exact = sample_counts(target, 1200, batch_size=batch_size, **method)
    assert chi_square_p_value(exact, probs) > 0.01
    # The test has the power to see a wrong acceptance rule: accepting drafts 3x too readily is caught.
    biased = sample_counts(target, 300, batch_size=batch_size, acceptance="relaxed", relax=3.0, **method)
    assert chi_square_p_value(biased, probs) < 1e-4


def test_jacobi_guesses_for_new_window_positions_keep_sampling_exact(one_thread):
    # A window of 1 over 4 tokens: a pass that keeps 2 tokens leaves no guess for the next position, which is then
    # guessed from the last pass's distribution (the 3 tokens of the tests above never get there).
    model = random_rar(4, num_layers=2, codebook_size=3, image_seq_len=4)
    probs = exact_distribution(model, **SAMPLING)
    assert chi_square_p_value(sample_counts(model, 1200, jacobi_window=1), probs) > 0.01


def test_prompt_lookup_drafts_keep_sampling_exact(one_thread):
    # 3 codes over 4 tokens: most images repeat a code, so the one-hot n-gram drafts are proposed often.
    model = random_rar(4, num_layers=2, codebook_size=3, image_seq_len=4)
    probs = exact_distribution(model, **SAMPLING)
    lookup = dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=1)
    assert chi_square_p_value(sample_counts(model, 1200, **lookup), probs) > 0.01
    biased = sample_counts(model, 600, acceptance="relaxed", relax=3.0, **lookup)
    assert chi_square_p_value(biased, probs) < 1e-4


def test_window_processors_match_the_processors_step_by_step():
    from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from rar_hf.generation_rar import NonFiniteLogitsError, RARClassifierFreeGuidanceLogitsProcessor, RARFiniteLogitsCheck
    from rar_hf.speculative_rar import _WindowProcessors

    class PrefixLength(LogitsProcessor):  # reads the prefix: the window must fall back to step by step
        def __call__(self, input_ids, scores):
            return scores + input_ids.shape[1]

    def step_by_step(processors, sequence, logits, keep_from):
        steps = []
        for i in range(logits.shape[1]):
            scores = logits[:, i]
            for processor in processors:
                scores = processor(sequence[:, : keep_from + i + 1], scores)
            steps.append(scores)
        return torch.stack(steps, dim=1)

    torch.manual_seed(0)
    length, batch_size, keep_from, steps = 16, 2, 5, 7
    sequence = torch.randint(0, 32, (batch_size, 1 + keep_from + steps))
    logits = torch.randn(2 * batch_size, steps, 32) * 3
    guidance = RARClassifierFreeGuidanceLogitsProcessor(guidance_scales(length, 3.0, "pow-cosine", 2.0))
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(9), TopPLogitsWarper(0.8)]
    for chain, vectorised in [([RARFiniteLogitsCheck(), guidance, *warpers], True), ([guidance, PrefixLength()], False)]:
        window = _WindowProcessors(LogitsProcessorList(chain))
        assert window.vectorised is vectorised
        assert torch.equal(window(sequence, logits, keep_from), step_by_step(chain, sequence, logits, keep_from))
    logits[0, 3, 1] = float("nan")  # the step it belongs to is named, as plain generate() names it
    window = _WindowProcessors(LogitsProcessorList([RARFiniteLogitsCheck(), guidance]))
    with pytest.raises(NonFiniteLogitsError, match=f"image token {keep_from + 3}"):
        window(sequence, logits, keep_from)


@pytest.fixture(scope="module")
def larger_models(one_thread):
    return random_rar(2, num_layers=2, codebook_size=16, image_seq_len=16), random_rar(3, 1, 16, 16)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
@pytest.mark.parametrize(
    "method",
    [dict(assistant="draft"), dict(assistant="self", num_assistant_tokens=3), dict(jacobi_window=1),
     dict(jacobi_window=4), dict(jacobi_window=16), dict(prompt_lookup_num_tokens=3)],
    ids=["draft-model", "self-draft", "jacobi-1", "jacobi-4", "jacobi-16", "prompt-lookup"],
)  # fmt: skip
def test_greedy_speculative_decoding_gives_the_greedy_tokens(larger_models, method, cache_implementation):
    target, draft = larger_models
    method = dict(method)
    assistant = method.pop("assistant", None)
    if assistant:
        method["assistant_model"] = draft if assistant == "draft" else target
    ids = target.prepare_class_ids([0, None, 2])
    orders = torch.stack([torch.randperm(16) for _ in range(3)])
    for guidance_scale, order in [(3.0, None), (1.0, orders)]:  # a guided schedule; a random order per row
        kwargs = dict(guidance_scale=guidance_scale, guidance_scale_pow=1.0, orders=order, do_sample=False,
                      cache_implementation=cache_implementation)  # fmt: skip
        plain = target.generate(ids, **kwargs)
        assert torch.equal(target.generate(ids, **kwargs, **method), plain)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
@pytest.mark.parametrize(
    "method", [dict(jacobi_window=3), dict(assistant_model="self", num_assistant_tokens=2),
               dict(prompt_lookup_num_tokens=2)], ids=["jacobi", "self-draft", "prompt-lookup"],
)  # fmt: skip
def test_speculative_decoding_returns_what_plain_decoding_returns(larger_models, method, cache_implementation):
    """transformers' contract for assisted decoding: the standard processors and stopping criteria apply, and the dict
    outputs (scores, logits, hidden states, attentions, per generated token, and the cache) are those of plain decoding.
    Here from a prefix of 3 known tokens, with guidance, repetition penalty and bad words."""
    target, _ = larger_models
    target.set_attn_implementation("eager")
    try:
        method = {k: (target if v == "self" else v) for k, v in method.items()}
        greedy = target.generate(target.prepare_class_ids([0, None]), guidance_scale=3.0, do_sample=False)
        prompt = greedy[:, :4]
        kwargs = dict(guidance_scale=3.0, do_sample=False, max_new_tokens=9, repetition_penalty=1.3,
                      bad_words_ids=[[1, 0]], remove_invalid_values=True, cache_implementation=cache_implementation,
                      return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True,
                      output_attentions=True)  # fmt: skip
        plain = target.generate(prompt, **kwargs)
        fast = target.generate(prompt, **kwargs, **method)
        assert torch.equal(fast.sequences, plain.sequences) and fast.sequences.shape == (2, 13)
        for name in ("scores", "logits"):
            assert len(getattr(fast, name)) == 9
            torch.testing.assert_close(torch.stack(getattr(fast, name)), torch.stack(getattr(plain, name)), atol=1e-5, rtol=1e-5)
        for name in ("hidden_states", "attentions"):
            for fast_step, plain_step in zip(getattr(fast, name), getattr(plain, name), strict=True):
                for a, b in zip(fast_step, plain_step, strict=True):
                    assert a.shape == b.shape, name
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert type(fast.cache) is type(plain.cache)
        # Stopping criteria: an EOS ends a row (its later tokens are the pad id), and generation when all rows ended.
        eos = int(plain.sequences[0, 6])
        stop = dict(kwargs, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(target.generate(prompt, **stop, **method).sequences, target.generate(prompt, **stop).sequences)
    finally:
        target.set_attn_implementation("sdpa")


def test_streamer_and_step_callback_see_every_kept_token(larger_models):
    from transformers.generation.streamers import BaseStreamer

    from rar_hf.generation_rar import RARStepCallback

    target, _ = larger_models

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(value.shape[0], -1) if value.dim() > 1 else value[:, None])

        def end(self):
            self.ended = True

    ids = target.prepare_class_ids([1, 2])
    for method in (dict(), dict(jacobi_window=4)):
        streamer, steps = Recorder(), []
        callback = RARStepCallback(lambda step, tokens: steps.append(step), target.config.codebook_size)
        out = target.generate(ids, guidance_scale=2.0, do_sample=False, streamer=streamer, step_callback=callback,
                              **method)  # fmt: skip
        assert streamer.ended and torch.equal(torch.cat(streamer.puts, dim=1), out)  # the prompt, then every token
        assert steps == list(range(16))
    # A callback that replaces a token: generation continues from the replacement, as in plain decoding.
    def replace(step, tokens):
        if step == 5:
            tokens[:, 2] = (tokens[:, 2] + 1) % 16
            return tokens
        return None

    plain = target.generate(ids, guidance_scale=2.0, do_sample=False,
                            step_callback=RARStepCallback(replace, 16))  # fmt: skip
    fast = target.generate(ids, guidance_scale=2.0, do_sample=False, jacobi_window=4,
                           step_callback=RARStepCallback(replace, 16))  # fmt: skip
    assert torch.equal(fast, plain)
    assert torch.equal(plain[:, 1:7], target.generate(plain[:, :7], guidance_scale=2.0, do_sample=False)[:, 1:7])


def test_self_drafting_accepts_every_draft(larger_models):
    target, _ = larger_models
    stats = SpeculativeStats()
    target.generate(target.prepare_class_ids([1]), assistant_model=target, num_assistant_tokens=4, guidance_scale=2.0,
                    stats=stats, generator=torch.Generator().manual_seed(0))  # fmt: skip
    # 16 tokens as 5 + 5 + 5 + 1 (the last step has nothing after it to draft for).
    assert stats.accepted_per_forward == [5, 5, 5, 1]
    assert (stats.target_forwards, stats.draft_forwards, stats.tokens_per_forward) == (4, 12, 4.0)


def test_speculative_arguments_are_checked(larger_models):
    target, draft = larger_models
    ids = target.prepare_class_ids([1])
    with pytest.raises(ValueError, match="codebook_size: target 16, assistant 4"):
        target.generate(ids, assistant_model=random_rar(0, 1))
    with pytest.raises(ValueError, match="exactly one of"):
        target.generate(ids, assistant_model=draft, jacobi_window=4)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be a positive int"):
        target.generate(ids, prompt_lookup_num_tokens=0)
    with pytest.raises(ValueError, match="jacobi_window must be a positive int, got 0"):
        target.generate(ids, jacobi_window=0)
    with pytest.raises(ValueError, match="num_assistant_tokens must be a positive int"):
        target.generate(ids, assistant_model=draft, num_assistant_tokens=0)
    with pytest.raises(ValueError, match=r"does not support the generate\(\) argument\(s\) \['my_input'\]"):
        target.generate(ids, jacobi_window=2, my_input=3)
    with pytest.raises(ValueError, match=r"\['acceptance'\] only apply to speculative decoding"):
        target.generate(ids, acceptance="relaxed")
    with pytest.raises(ValueError, match="acceptance must be one of"):
        target.generate(ids, jacobi_window=2, acceptance="greedy")
    with pytest.raises(ValueError, match="use_cache=False"):
        target.generate(ids, jacobi_window=2, use_cache=False)


def test_pipeline_takes_a_draft_model_or_a_jacobi_window(one_thread):
    from test_pipeline_rar import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def tokens(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return pipe([0, 2], generator=generator, output_type="tokens", guidance_scale=2.0, **kwargs).tokens

    for method in (dict(jacobi_window=4), dict(assistant_model=pipe.transformer)):
        assert torch.equal(tokens(0, **method), tokens(0, **method))  # the pipeline's generator drives the draws
        assert not torch.equal(tokens(0, **method), tokens(1, **method))
    # Both options reach the speculative loops (which check them), not plain sampling.
    with pytest.raises(ValueError, match="jacobi_window must be a positive int"):
        tokens(0, jacobi_window=-1)
    with pytest.raises(ValueError, match="codebook_size: target 16, assistant 4"):
        tokens(0, assistant_model=random_rar(0, 1))


def test_benchmark_script_prints_the_table(capsys, monkeypatch):
    import runpy
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shipped = repo / "src" / "rar_hf" / "pretrained" / "tiny-digits"
    # The shipped model drafting for itself keeps every draft: 64 tokens in 21 passes of 3 and a last one of 1.
    args = ["--draft", shipped, "--num_assistant_tokens", "2", "--jacobi_windows", "2", "--speed_images", "1",
            "--repeats", "1", "--num_per_class", "0", "--threads", "1"]  # fmt: skip
    script = repo / "benchmarks" / "speculative.py"
    monkeypatch.setattr("sys.argv", [str(script), *map(str, args)])
    monkeypatch.syspath_prepend(str(script.parent))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert exit.value.code in (0, None), out
    assert "| draft model (4-layer), 2 tokens | 2.91 | 22.0 (+ 42.0) |" in out
    assert "| Jacobi, window 2 |" in out
