"""Lossless speculative decoding for RAR: a small RAR drafting for a large one, and speculative Jacobi decoding.

Both methods propose several image tokens, score all of them with one forward pass of the target model and keep a
prefix with the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): a draft `x` drawn from `q` is
accepted with probability `min(1, p(x) / q(x))`, and the first rejected one is replaced by a draw from
`max(0, p - q)` (normalised). Whatever the drafts, every kept token is then distributed exactly as plain sampling
would draw it from `p`, the target's processed distribution, built by the very processors plain `generate()` uses
(guidance, repetition penalty, bad words, temperature, top-k/p, user processors). With `do_sample=False` a draft is
kept when it is the target's argmax, so the tokens are those of plain greedy decoding.

- **Draft model** (`assistant_model=`): a smaller RAR with the same codebook, classes and sequence length drafts
  `num_assistant_tokens` tokens one by one, with the same processors.
- **Prompt lookup** (`prompt_lookup_num_tokens=`, transformers' name): drafts the tokens that followed the most recent
  earlier occurrence of the last n-gram (`max_matching_ngram_size`, default 2) of the image so far: flat backgrounds and
  repeated textures repeat their codes. A draft copied this way is proposed with certainty (`q` one-hot), which the
  rule above handles exactly; rows without a match guess uniformly.
- **Speculative Jacobi decoding** (`jacobi_window=`, Teng et al. 2024, arXiv 2410.01699): training-free. The target
  keeps a window of guessed future tokens; each forward pass scores the window, keeps the accepted prefix, and its
  outputs at the positions after the cut, drawn afresh, become the next guesses (new positions are guessed from the
  target's last distribution mixed with uniform; the very first pass guesses uniformly). Drawing the guesses afresh
  (instead of keeping drafts that already passed a test) is what keeps it exact.

A batch shares one cache, so every row keeps the same number of tokens per pass: the smallest number any row reached.
Cutting a row's exact prefix at a point decided by the other rows keeps it exact (the discarded tokens are redrafted),
so batches are exact too; they just accept fewer tokens per pass than one row alone.

This module only drafts and accepts: the model inputs of every pass come from `generation_rar.step_inputs` (as for
plain decoding), the processors and stopping criteria from the model's generation machinery, and the outputs
(`return_dict_in_generate`, `output_scores`, `output_logits`, `output_hidden_states`, `output_attentions`, `cache`)
are those of plain decoding, one entry per generated token. The caches are transformers' (`StaticCache` or
`DynamicCache`), rolled back with `crop` after each verification.
"""

import copy
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .sampling_rar import (
    RARClassifierFreeGuidanceLogitsProcessor,
    RARFiniteLogitsCheck,
    RARModulationCache,
    cached_entries,
    check_generators,
    step_inputs,
    uniform_draws,
)

ACCEPTANCE_RULES = ("lossless", "relaxed")
# Jacobi decoding: weight of the target's last distribution in the guesses for brand-new window positions.
_FRESH_FROM_LAST = 0.9


@dataclass
class SpeculativeStats:
    """Counts of one speculative `generate()` call (for benchmarks): forward passes of each model and tokens kept."""

    target_forwards: int = 0
    draft_forwards: int = 0
    tokens: int = 0
    accepted_per_forward: list = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.target_forwards, 1)


def acceptance_probability(p_draft: torch.Tensor, q_draft: torch.Tensor, rule: str = "lossless", relax: float = 1.0):
    """Probability of keeping a draft token that `q` proposed and whose target probability is `p`.

    `"lossless"`: `min(1, p / q)`, the rule that keeps sampling exact. `"relaxed"` (not exact, never the default):
    `min(1, relax * p / q)` with `relax >= 1`, which keeps more drafts and tilts the output towards the proposals.
    """
    scale = 1.0 if rule == "lossless" else relax
    return torch.where(q_draft > 0, (scale * p_draft / q_draft.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(q_draft))


class _Drawer:
    """Uniform draws from the caller's generator(s): one for the batch, one per row, or torch's global RNG."""

    def __init__(self, generator, batch_size: int, device):
        check_generators(generator, batch_size)
        self.generator, self.batch_size, self.device = generator, batch_size, device

    def uniform(self, *shape) -> torch.Tensor:
        """`(batch, *shape)` uniforms in [0, 1)."""
        return uniform_draws((self.batch_size, *shape), self.generator, self.device)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of `probs` (`(batch, ..., vocab)`), by inverting the cumulative distribution."""
        cumulative = probs.cumsum(-1)
        u = self.uniform(*probs.shape[1:-1]).to(probs.dtype) * cumulative[..., -1]
        # side='right': a token of probability 0 (an empty interval) is never picked, even for u = 0.
        return torch.searchsorted(cumulative, u[..., None], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


# Processors that transform each row of scores on its own, whatever the step and the tokens before it.
_ROW_WISE_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)


class _WindowProcessors:
    r"""
    A processor chain applied to the scores of a whole window of steps at once, as plain `generate()` applies it one
    step at a time. A pass of the toy models is bound by per-op overhead, and the chain step by step cost as much as
    the forward pass itself.

    Row-wise warpers see the window flattened to `(rows * steps, V)`; classifier-free guidance takes the scale of
    every step as one tensor; the finite check looks at the window once (and, on a non-finite value, the chain is
    replayed step by step so that it names the step). Any other processor may read the prefix (repetition penalty,
    bad words, ...): then the whole chain runs step by step, each step seeing the prefix it continues.
    """

    def __init__(self, processors: LogitsProcessorList):
        self.processors = processors
        known = _ROW_WISE_PROCESSORS + (RARClassifierFreeGuidanceLogitsProcessor, RARFiniteLogitsCheck)
        self.vectorised = all(type(processor) in known for processor in processors)

    def __call__(self, sequence: torch.LongTensor, logits: torch.Tensor, keep_from: int) -> torch.Tensor:
        """Scores `(B, T, V)` of steps `keep_from .. keep_from + T - 1` from the model's logits `(R, T, V)`."""
        if not self.vectorised:
            return self._step_by_step(sequence, logits, keep_from)
        scores = logits
        end = keep_from + logits.shape[1]
        for processor in self.processors:
            if type(processor) is RARFiniteLogitsCheck:
                if not processor.deferred(scores):
                    if not torch.isfinite(scores).all():
                        return self._step_by_step(sequence, logits, keep_from)  # raises, naming the step
                else:
                    processor(sequence[:, :end], scores)
            elif type(processor) is RARClassifierFreeGuidanceLogitsProcessor:
                # Step i of the window continues a sequence of keep_from + i + 1 tokens, as the processor counts.
                scale = [processor.scale_for(length) for length in range(keep_from + 1, end + 1)]
                scores = processor.guide(scores, torch.tensor(scale, device=scores.device)[None, :, None])
            else:
                rows, steps, vocab = scores.shape
                scores = processor(sequence[:, :end], scores.reshape(rows * steps, vocab)).reshape(rows, steps, vocab)
        return scores

    def _step_by_step(self, sequence, logits, keep_from):
        steps = []
        for i in range(logits.shape[1]):
            scores = logits[:, i]
            # The processors one by one: LogitsProcessorList.__call__ inspects signatures on every call.
            for processor in self.processors:
                scores = processor(sequence[:, : keep_from + i + 1], scores)
            steps.append(scores)
        return torch.stack(steps, dim=1)


@dataclass
class _Pass:
    """What one forward pass of a model gave for steps `keep_from .. keep_from + T - 1`."""

    keep_from: int
    scores: torch.Tensor  # (B, T, V) processed
    logits: torch.Tensor | None = None  # (R, T, V) raw
    hidden_states: tuple | None = None  # per layer (R, slots, H), over the slots the pass ran
    attentions: tuple | None = None
    first_slot_index: int = 0  # index, in the pass's slots, of the slot that predicts step keep_from


class _GuidedModel:
    r"""
    One RAR's side of a speculative generation: its cache, how much of the sequence it has consumed, and its processed
    scores for any stretch of new tokens.

    `sequence` is `(B, 1 + n)`: the class token, then `n` image tokens in generation order. Feeding `sequence[:, a:b]`
    yields the distributions of image tokens (steps) `a .. b - 1`, each passed through `processors` with the prefix it
    continues, as plain `generate()` does one step at a time (with guidance, the model runs `[conditional; null]`).
    """

    def __init__(
        self, model, rows, orders, guidance, processors, cache_implementation, max_length, cache=None, outputs=()
    ):
        self.model, self.guidance, self.orders = model, guidance, orders
        config = model.config
        self.processors = _WindowProcessors(processors)
        if cache is not None:
            self.cache: Cache = cache
        elif cache_implementation == "static":
            # Made and sized as plain generate() makes it: the cls slot and every entry but the last (never fed).
            self.cache = model._prepare_static_cache("static", rows, max_length, None, {})
        elif cache_implementation in (None, "dynamic"):
            self.cache = DynamicCache(config=config)
        else:
            raise ValueError(
                f"Speculative decoding supports cache_implementation='static' or 'dynamic', got {cache_implementation!r}."
            )
        self.rows = rows
        self.modulation_cache = RARModulationCache()
        self.fed = cached_entries(cache)  # entries of `sequence` whose keys/values are in the cache
        self.forwards = 0
        self.outputs = set(outputs)  # among "logits", "hidden_states", "attentions": what to keep of each pass

    def rollback(self, length: int):
        """Forget every fed entry of the sequence from index `length` on."""
        if length < self.fed:
            self.cache.crop(length - self.fed)
            self.fed = length

    def scores(self, sequence: torch.LongTensor, end: int, keep_from: int) -> _Pass:
        """Feed `sequence[:, fed:end]`; the processed scores `(B, end - keep_from, V)` of steps `keep_from..end-1`."""
        start = self.fed
        if start >= end:  # everything is cached already (a continued cache): run the last entry again
            self.rollback(end - 1)
            start = self.fed
        if not start <= keep_from < end:
            raise RuntimeError(f"Cannot score steps {keep_from}..{end - 1} with {start} tokens fed.")
        inputs = step_inputs(self.model, sequence[:, :end], start, self.guidance, self.modulation_cache)
        output_flags = {f"output_{name}": True for name in ("hidden_states", "attentions") if name in self.outputs}
        outputs = self.model(
            **inputs, orders=self.orders, cache=self.cache, use_cache=True, logits_to_keep=end - keep_from, **output_flags
        )
        self.fed = end
        self.forwards += 1
        logits = outputs.logits.float()
        return _Pass(
            keep_from=keep_from,
            scores=self.processors(sequence, logits, keep_from),
            logits=logits if "logits" in self.outputs else None,
            hidden_states=outputs.hidden_states if "hidden_states" in self.outputs else None,
            attentions=outputs.attentions if "attentions" in self.outputs else None,
            first_slot_index=keep_from - start + (1 if start == 0 else 0),
        )


def _probabilities(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if do_sample:
        return torch.softmax(scores, dim=-1)
    # Greedy is sampling from the one-hot distribution of the argmax (ties: the lowest id, as torch.argmax).
    return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)


def _verify(drafts, q, p, drawer: _Drawer, rule: str, relax: float, do_sample: bool):
    r"""
    Speculative sampling of one window, for every row.

    Args:
        drafts (`(B, k)`): proposed tokens; `q` (`(B, k, V)`) the distributions they were drawn from.
        p (`(B, k + 1, V)`): the target's distributions at those steps and at the step after them.

    Returns:
        `(B,)` number of drafts each row accepts, and `(B,)` the token that follows them: a draw from the residual
        `max(0, p - q)` at the first rejection, or from `p` after the last draft.
    """
    batch_size, k = drafts.shape
    if k:
        p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
        if do_sample:
            q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
            keep = drawer.uniform(k) < acceptance_probability(p_draft, q_draft, rule, relax)
        else:
            keep = p_draft > 0
        # Number of leading accepted drafts.
        accepted = keep.to(torch.long).cumprod(dim=1).sum(dim=1)
    else:
        accepted = torch.zeros(batch_size, dtype=torch.long, device=drafts.device)
    rows = torch.arange(batch_size, device=drafts.device)
    target = p[rows, accepted]
    if k:
        q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
        residual = (target - q_padded[rows, accepted]).clamp_min(0)
        total = residual.sum(-1, keepdim=True)
        # After the last draft (q padded with zeros) the residual is p itself; an empty residual only happens when
        # p == q, where rejection has probability 0, so falling back to p there changes nothing.
        target = torch.where(total > 0, residual / total.clamp_min(1e-30), target)
    return accepted, drawer.categorical(target)


def check_assistant(target, assistant):
    """A draft model must share the codebook, classes, sequence length and latent grid of the target."""
    if not isinstance(assistant, type(target)):
        raise ValueError(f"assistant_model must be a {type(target).__name__}, got {type(assistant).__name__}.")
    fields = ("codebook_size", "num_classes", "image_seq_len", "latent_size", "null_class_id")
    mismatched = [
        f"{name}: target {getattr(target.config, name)!r}, assistant {getattr(assistant.config, name)!r}"
        for name in fields
        if getattr(target.config, name) != getattr(assistant.config, name)
    ]
    if mismatched:
        raise ValueError("assistant_model does not share the target's token space: " + "; ".join(mismatched) + ".")


class _Run:
    r"""The growing sequence of one speculative call and everything plain decoding would report about it: per-step
    scores and raw outputs, stopping criteria (EOS and user criteria), the streamer and the step callback."""

    def __init__(self, model, input_ids, generation_config, stopping_criteria, streamer, step_callback, goal):
        self.model, self.sequence, self.goal = model, input_ids, goal
        self.prompt_entries = input_ids.shape[1]
        config = generation_config
        self.return_dict = bool(config.return_dict_in_generate)
        self.keep = {
            name: self.return_dict and bool(getattr(config, f"output_{name}"))
            for name in ("scores", "logits", "hidden_states", "attentions")
        }
        self.records = {name: [] for name, wanted in self.keep.items() if wanted}
        self.criteria = stopping_criteria
        self.pad_token_id = config._pad_token_tensor
        self.has_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.streamer, self.step_callback = streamer, step_callback
        self.stopped = False
        self.static_cache = False
        if streamer is not None:
            streamer.put(input_ids.cpu())

    @property
    def image_tokens(self) -> int:
        return self.sequence.shape[1] - 1

    @property
    def done(self) -> bool:
        return self.stopped or self.image_tokens >= self.goal or not bool(self.unfinished.any())

    def _record(self, target_pass: _Pass, i: int):
        """Keep, for step `keep_from + i`, what plain decoding reports: its scores and the raw outputs of its slot
        (on the very first step, of every slot of the prompt, as plain decoding's prefill)."""
        first_step = target_pass.keep_from + i == self.prompt_entries - 1
        index = target_pass.first_slot_index + i
        slots = slice(0, index + 1) if first_step else slice(index, index + 1)
        if "scores" in self.records:
            self.records["scores"].append(target_pass.scores[:, i])
        if "logits" in self.records:
            self.records["logits"].append(target_pass.logits[:, i])
        if "hidden_states" in self.records:
            self.records["hidden_states"].append(tuple(h[:, slots] for h in target_pass.hidden_states))
        if "attentions" in self.records:
            # Keys: the slots filled up to this step's (a static cache always shows all its slots, as in plain decoding).
            keys = slice(None) if self.static_cache else slice(0, target_pass.keep_from + i + 2)
            self.records["attentions"].append(tuple(a[:, :, slots, keys] for a in target_pass.attentions))

    def commit(self, tokens: torch.LongTensor, target_pass: _Pass) -> int | None:
        """Append `tokens` (`(B, m)`, steps `keep_from ..`) one by one as plain decoding would: records, stopping
        criteria, streamer, step callback. Returns `None`, or the entry index from which the caches must be rolled
        back because the step callback replaced tokens (the tokens after the replaced one are then dropped)."""
        for i in range(tokens.shape[1]):
            token = tokens[:, i]
            if self.has_eos and self.pad_token_id is not None:
                token = torch.where(self.unfinished, token, self.pad_token_id.to(token.device))
            self.sequence = torch.cat([self.sequence, token[:, None]], dim=1)
            self._record(target_pass, i)
            scores = self.records["scores"][-1] if "scores" in self.records else None
            self.unfinished &= ~self.criteria(self.sequence, scores)
            if self.streamer is not None:
                self.streamer.put(token.cpu())
            if self.step_callback is not None:
                before = self.sequence.clone()
                self.stopped = self.step_callback.after_token(self.sequence)
                self.step_callback.pop_rewind()
                changed = (self.sequence != before).any(dim=0).nonzero()
                if changed.numel():
                    return int(changed[0])  # the caches keep the entries before it
            if self.done:
                return None
        return None

    def output(self, cache):
        if self.streamer is not None:
            self.streamer.end()
        if not self.return_dict:
            return self.sequence
        fields = {name: tuple(values) for name, values in self.records.items()}
        return GenerateDecoderOnlyOutput(sequences=self.sequence, cache=cache, **fields)


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    generation_config,
    model_kwargs: dict,
    guidance: bool = False,
    orders=None,
    generator=None,
    step_callback=None,
    logits_processor: LogitsProcessorList | None = None,
    assistant_model=None,
    num_assistant_tokens: int | None = None,
    jacobi_window: int | None = None,
    prompt_lookup_num_tokens: int | None = None,
    acceptance: str = "lossless",
    relax: float = 2.0,
    stats: SpeculativeStats | None = None,
):
    r"""
    Generate the image tokens after `input_ids` (class token and any known tokens, generation order) with a draft
    model or with speculative Jacobi decoding. Called by `RARGenerationMixin.generate`, which resolved
    `generation_config` (sampling settings, lengths, output flags) and `model_kwargs` (cache, streamer, stopping
    criteria, output flags) as for plain decoding.

    Args:
        assistant_model ([`RARForImageGeneration`], *optional*): the draft model.
        num_assistant_tokens (`int`, *optional*): tokens the draft model proposes per round (default: the assistant's
            `generation_config.num_assistant_tokens`, 4 for RAR models).
        jacobi_window (`int`, *optional*): speculative Jacobi decoding with this many guessed tokens per pass.
        acceptance (`str`): `"lossless"` (default, exact) or `"relaxed"` (accepts drafts `relax` times more
            readily; faster, NOT exact: the samples drift towards the proposals).
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the random draws.
        stats ([`SpeculativeStats`], *optional*): filled with forward-pass counts.

    Returns:
        As plain `generate()` before the reordering to raster: `(B, 1 + k + n)` in generation order, or a
        `GenerateDecoderOnlyOutput`.
    """
    methods = [name for name, value in (("assistant_model", assistant_model), ("jacobi_window", jacobi_window),
               ("prompt_lookup_num_tokens", prompt_lookup_num_tokens)) if value is not None]  # fmt: skip
    if len(methods) != 1:
        raise ValueError(
            "Pass exactly one of assistant_model= (draft model), jacobi_window= (Jacobi decoding) and "
            f"prompt_lookup_num_tokens= (prompt lookup); got {methods or 'none'}."
        )
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE_RULES}, got {acceptance!r}.")
    if acceptance == "relaxed" and not relax >= 1.0:
        raise ValueError(f"relax must be >= 1 (1 is the lossless rule), got {relax!r}.")
    if generation_config.use_cache is False:
        raise ValueError("Speculative decoding re-uses the KV cache between passes: use_cache=False cannot apply.")
    if generation_config.num_return_sequences not in (None, 1):
        raise ValueError("Speculative decoding returns one sequence per prompt (num_return_sequences=1).")
    model_kwargs = dict(model_kwargs)
    cache = model_kwargs.pop("cache", None)
    streamer = model_kwargs.pop("streamer", None)
    user_criteria = model_kwargs.pop("stopping_criteria", None)
    for name in ("output_attentions", "output_hidden_states", "synced_gpus", "use_cache"):
        model_kwargs.pop(name, None)
    if model_kwargs:
        raise ValueError(
            f"Speculative decoding does not support the generate() argument(s) {sorted(model_kwargs)}: they are "
            "model inputs that only plain decoding passes to forward()."
        )
    batch_size = input_ids.shape[0]
    rows = batch_size * (2 if guidance else 1)
    do_sample = bool(generation_config.do_sample)
    goal = input_ids.shape[1] - 1 + generation_config.max_new_tokens
    generation_config = copy.copy(generation_config)
    generation_config.max_length = input_ids.shape[1] + generation_config.max_new_tokens
    model._prepare_special_tokens(generation_config, False, device=input_ids.device, batch_size=batch_size)
    # The processor chain plain generate() builds (RAR's guidance, transformers' processors, user ones, warpers).
    processors = model._get_logits_processor(
        generation_config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=logits_processor or LogitsProcessorList(), device=input_ids.device,
        model_kwargs={"guidance": guidance},
    )  # fmt: skip
    stopping_criteria = model._get_stopping_criteria(generation_config, stopping_criteria=user_criteria or [])
    run = _Run(model, input_ids, generation_config, stopping_criteria, streamer, step_callback, goal)
    outputs = [name for name in ("logits", "hidden_states", "attentions") if run.keep[name]]
    drawer = _Drawer(generator, batch_size, input_ids.device)
    stats = stats if stats is not None else SpeculativeStats()
    cache_implementation = generation_config.cache_implementation
    target = _GuidedModel(
        model, rows, orders, guidance, processors, cache_implementation, generation_config.max_length, cache, outputs
    )
    run.static_cache = isinstance(target.cache, StaticCache)
    if assistant_model is not None:
        check_assistant(model, assistant_model)
        window = num_assistant_tokens
        if window is None:
            window = getattr(assistant_model.generation_config, "num_assistant_tokens", None) or 4
        if type(window) is not int or window < 1:
            raise ValueError(f"num_assistant_tokens must be a positive int, got {window!r}.")
        draft = _GuidedModel(
            assistant_model, rows, orders, guidance, processors, cache_implementation, generation_config.max_length
        )
        _draft_model_loop(run, target, draft, window, drawer, acceptance, relax, do_sample, stats)
        stats.draft_forwards += draft.forwards
    elif jacobi_window is not None:
        if type(jacobi_window) is not int or jacobi_window < 1:
            raise ValueError(f"jacobi_window must be a positive int, got {jacobi_window!r}.")
        _jacobi_loop(run, target, jacobi_window, drawer, acceptance, relax, do_sample, stats)
    else:
        if type(prompt_lookup_num_tokens) is not int or prompt_lookup_num_tokens < 1:
            raise ValueError(f"prompt_lookup_num_tokens must be a positive int, got {prompt_lookup_num_tokens!r}.")
        max_ngram = generation_config.max_matching_ngram_size or 2
        _lookup_loop(run, target, prompt_lookup_num_tokens, max_ngram, drawer, acceptance, relax, do_sample, stats)
    stats.target_forwards += target.forwards
    stats.tokens += (run.image_tokens - (input_ids.shape[1] - 1)) * batch_size
    return run.output(target.cache)


def _kept(drafts, accepted, following):
    """The tokens every row keeps: `m = min(accepted + 1)` of them, the same number for all rows."""
    m = int((accepted + 1).min())
    tokens = torch.cat([drafts, following[:, None]], dim=1)[:, :m].clone()
    # The rows that stopped at m keep their residual draw as their last token; the others keep accepted drafts.
    last = accepted == m - 1
    tokens[last, m - 1] = following[last]
    return tokens


def _draft_model_loop(run, target, draft, window, drawer, acceptance, relax, do_sample, stats):
    while not run.done:
        n = run.image_tokens
        k = min(window, run.goal - n - 1)  # the step after the last draft must exist
        drafts, q = run.sequence[:, :0], []
        for i in range(k):
            step = draft.scores(torch.cat([run.sequence, drafts], dim=1), n + i + 1, n + i)
            probs = _probabilities(step.scores[:, 0], do_sample)
            q.append(probs)
            drafts = torch.cat([drafts, drawer.categorical(probs)[:, None]], dim=1)
        verified = target.scores(torch.cat([run.sequence, drafts], dim=1), n + k + 1, n)
        p = _probabilities(verified.scores, do_sample)
        q = torch.stack(q, dim=1) if q else p[:, :0]
        tokens = _kept(drafts, *_verify(drafts, q, p, drawer, acceptance, relax, do_sample))
        stats.accepted_per_forward.append(tokens.shape[1])
        replaced = run.commit(tokens, verified)
        # Entries up to the last kept token are valid; the newest token is fed next round.
        keep = run.sequence.shape[1] - 1 if replaced is None else min(replaced, run.sequence.shape[1] - 1)
        target.rollback(keep)
        draft.rollback(keep)


def _jacobi_loop(run, target, window, drawer, acceptance, relax, do_sample, stats):
    vocab_size = target.model.config.codebook_size
    batch_size, device = run.sequence.shape[0], run.sequence.device
    uniform = torch.full((batch_size, vocab_size), 1.0 / vocab_size, device=device)
    fresh = uniform  # what brand-new window positions are guessed from
    drafts = run.sequence[:, :0]
    q = torch.zeros(batch_size, 0, vocab_size, device=device)
    while not run.done:
        n = run.image_tokens
        k = min(window, run.goal - n - 1)
        drafts, q = drafts[:, :k], q[:, :k]
        if drafts.shape[1] < k:
            # Any guess is exact as long as it is drawn from the q it is tested against.
            new_q = fresh[:, None].expand(batch_size, k - drafts.shape[1], vocab_size)
            drafts = torch.cat([drafts, drawer.categorical(new_q.contiguous())], dim=1)
            q = torch.cat([q, new_q], dim=1)
        verified = target.scores(torch.cat([run.sequence, drafts], dim=1), n + k + 1, n)
        p = _probabilities(verified.scores, do_sample)
        tokens = _kept(drafts, *_verify(drafts, q, p, drawer, acceptance, relax, do_sample))
        m = tokens.shape[1]
        stats.accepted_per_forward.append(m)
        replaced = run.commit(tokens, verified)
        if replaced is not None:  # the step callback changed the sequence: start the guesses afresh
            target.rollback(min(replaced, run.sequence.shape[1] - 1))
            drafts, q, fresh = run.sequence[:, :0], q[:, :0], uniform
            continue
        target.rollback(run.sequence.shape[1] - 1)
        # The target's distributions after the cut (conditioned on the old guesses) propose the next guesses, drawn
        # afresh: a guess that already passed a test would be biased towards passing.
        q = p[:, m:]
        drafts = drawer.categorical(q) if q.shape[1] else run.sequence[:, :0]
        # Positions beyond the window are guessed from the target's last distribution (neighbouring image tokens
        # look alike), with a tenth of uniform: a few hundredths more tokens per pass than uniform guesses alone.
        fresh = _FRESH_FROM_LAST * p[:, -1] + (1 - _FRESH_FROM_LAST) * uniform


def _lookup_drafts(tokens: torch.LongTensor, k: int, max_ngram: int, vocab_size: int, drawer: _Drawer):
    """Drafts `(B, k')` and the distributions they come from `(B, k', V)`: per row, the tokens that followed the most
    recent earlier occurrence of its last n-gram (longest n first), one-hot; positions no match covers are guessed
    uniformly. `k' = 0` when no row found anything (a plain step then)."""
    batch_size, n = tokens.shape
    found = []
    for row in tokens:
        continuation = row[:0]
        for size in range(min(max_ngram, n - 1), 0, -1):
            windows = row.unfold(0, size, 1)[: n - size]  # every earlier n-gram with at least one token after it
            starts = (windows == row[n - size :]).all(dim=1).nonzero()
            if starts.numel():
                start = int(starts[-1]) + size
                continuation = row[start : start + k]
                break
        found.append(continuation)
    width = max(len(c) for c in found)
    if width == 0:
        return tokens[:, :0], torch.zeros(batch_size, 0, vocab_size, device=tokens.device)
    uniform = torch.full((batch_size, width, vocab_size), 1.0 / vocab_size, device=tokens.device)
    guesses = drawer.categorical(uniform)
    q = uniform.clone()
    for row, continuation in enumerate(found):
        guesses[row, : len(continuation)] = continuation
        q[row, : len(continuation)] = torch.nn.functional.one_hot(continuation, vocab_size).to(q.dtype)
    return guesses, q


def _lookup_loop(run, target, num_tokens, max_ngram, drawer, acceptance, relax, do_sample, stats):
    vocab_size = target.model.config.codebook_size
    while not run.done:
        n = run.image_tokens
        k = min(num_tokens, run.goal - n - 1)
        drafts, q = _lookup_drafts(run.sequence[:, 1:], k, max_ngram, vocab_size, drawer)
        k = drafts.shape[1]
        verified = target.scores(torch.cat([run.sequence, drafts], dim=1), n + k + 1, n)
        p = _probabilities(verified.scores, do_sample)
        tokens = _kept(drafts, *_verify(drafts, q, p, drawer, acceptance, relax, do_sample))
        stats.accepted_per_forward.append(tokens.shape[1])
        replaced = run.commit(tokens, verified)
        keep = run.sequence.shape[1] - 1
        target.rollback(keep if replaced is None else min(replaced, keep))
