"""Lossless speculative decoding for RAR: a small RAR drafting for a large one, and speculative Jacobi decoding.

Both methods propose several image tokens, score all of them with one forward pass of the target model and keep a
prefix with the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): a draft `x` drawn from `q` is
accepted with probability `min(1, p(x) / q(x))`, and the first rejected one is replaced by a draw from
`max(0, p - q)` (normalised). Whatever the drafts, every kept token is then distributed exactly as plain sampling
would draw it from `p`, the target's guided, temperature-scaled (top-k/p-filtered) distribution, which is built by the
very processors plain `generate()` uses. With `do_sample=False` a draft is kept when it is the target's argmax, so
the tokens are those of plain greedy decoding.

- **Draft model** (`assistant_model=`): a smaller RAR with the same codebook, classes and sequence length drafts
  `num_assistant_tokens` tokens one by one, with the same guidance schedule and sampling settings.
- **Speculative Jacobi decoding** (`jacobi_window=`, Teng et al. 2024, arXiv 2410.01699): training-free. The target
  keeps a window of guessed future tokens; each forward pass scores the window, keeps the accepted prefix, and its
  outputs at the positions after the cut, drawn afresh, become the next guesses (new positions are guessed from the
  target's last distribution mixed with uniform; the very first pass guesses uniformly). Drawing the guesses afresh
  (instead of keeping drafts that already passed a test) is what keeps it exact.

A batch shares one cache, so every row keeps the same number of tokens per pass: the smallest number any row reached.
Cutting a row's exact prefix at a point decided by the other rows keeps it exact (the discarded tokens are redrafted),
so batches are exact too; they just accept fewer tokens per pass than one row alone.

The caches are transformers' (`StaticCache` or `DynamicCache`), rolled back with `crop` after each verification.
"""

from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .generation_rar import RARClassifierFreeGuidanceLogitsProcessor, RARFiniteLogitsCheck, uniform_draws
from .prepacked_linear import prepacked_linear_weights

ACCEPTANCE_RULES = ("lossless", "relaxed")
# Jacobi decoding: weight of the target's last distribution in the guesses for brand-new window positions.
_FRESH_FROM_LAST = 0.9
# generate() keywords the speculative loops understand; anything else would be silently ignored, so it is refused.
_SUPPORTED_KWARGS = {"do_sample", "temperature", "top_k", "top_p", "cache_implementation", "use_cache",
                     "max_new_tokens", "min_new_tokens"}  # fmt: skip


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
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} rows.")
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
    replayed step by step so that it names the step). Any other processor may read the prefix: then the whole chain
    runs step by step, as before.
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
                if processor.defer is False or (processor.defer is None and scores.device.type == "cpu"):
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


class _GuidedModel:
    r"""
    One RAR's side of a speculative generation: its cache, how much of the sequence it has consumed, and its guided
    scores for any stretch of new tokens.

    `sequence` is `(B, 1 + n)`: the class token, then `n` image tokens in generation order. Feeding `sequence[:, a:b]`
    yields the distributions of image tokens (steps) `a .. b - 1`, each passed through `processors` with the prefix it
    continues, as plain `generate()` does one step at a time (with guidance, the model runs `[conditional; null]`).
    """

    def __init__(self, model, input_ids, orders, guidance: bool, processors: LogitsProcessorList, cache_implementation):
        self.model, self.guidance = model, guidance
        config = model.config
        self.processors = _WindowProcessors(processors)
        rows = input_ids.shape[0] * (2 if guidance else 1)
        if cache_implementation == "static":
            # cls, the class token and every image token but the last (never fed); headroom for none beyond.
            self.cache: Cache = StaticCache(config=config, max_cache_len=config.image_seq_len + 2)
        elif cache_implementation in (None, "dynamic"):
            self.cache = DynamicCache(config=config)
        else:
            raise ValueError(
                f"Speculative decoding supports cache_implementation='static' or 'dynamic', got {cache_implementation!r}."
            )
        self.rows = rows
        condition_ids = input_ids[:, 0]
        self.null_id = config.null_class_id
        if guidance:
            condition_ids = torch.cat([condition_ids, torch.full_like(condition_ids, self.null_id)])
            orders = torch.cat([orders, orders]) if orders is not None else None
        self.condition_ids, self.orders = condition_ids, orders
        self.modulation_cache = model.modulation_cache_class()
        self.fed = 0  # entries of `sequence` whose keys/values are in the cache
        self.forwards = 0

    def rollback(self, length: int):
        """Forget every fed entry of the sequence from index `length` on."""
        if length < self.fed:
            self.cache.crop(length - self.fed)
            self.fed = length

    def scores(self, sequence: torch.LongTensor, end: int, keep_from: int) -> torch.Tensor:
        """Feed `sequence[:, fed:end]`; return the processed scores `(B, end - keep_from, V)` of steps `keep_from..end-1`."""
        start = self.fed
        if not start <= keep_from < end:
            raise RuntimeError(f"Cannot score steps {keep_from}..{end - 1} with {start} tokens fed.")
        new = sequence[:, start:end]
        # Slot j + 1 holds sequence[:, j] (slot 0 is the cls token, prepended by the model on a new sequence).
        first_slot = 0 if start == 0 else start + 1
        cache_position = torch.arange(first_slot, end + 1, device=sequence.device)
        if self.guidance:
            null = new.clone()
            if start == 0:
                null[:, 0] = self.null_id
            new = torch.cat([new, null])
        modulations = self.modulation_cache.modulations(
            self.model.model, self.condition_ids, first_slot, cache_position.shape[0]
        )
        logits = self.model(
            input_ids=new,
            condition_ids=self.condition_ids,
            orders=self.orders,
            cache=self.cache,
            use_cache=True,
            cache_position=cache_position,
            modulations=modulations,
            logits_to_keep=end - keep_from,
        ).logits.float()
        self.fed = end
        self.forwards += 1
        return self.processors(sequence, logits, keep_from)


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


def _commit(sequence, drafts, accepted, following):
    """Append the tokens every row keeps: `m = min(accepted + 1)` of them, the same number for all rows."""
    m = int((accepted + 1).min())
    tokens = torch.cat([drafts, following[:, None]], dim=1)[:, :m].clone()
    # The rows that stopped at m keep their residual draw as their last token; the others keep accepted drafts.
    last = accepted == m - 1
    tokens[last, m - 1] = following[last]
    return torch.cat([sequence, tokens], dim=1), m


def check_assistant(target, assistant):
    """A draft model must share the codebook, classes, sequence length and latent grid of the target."""
    # The target's own class, not an import of it: the model module imports this one.
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


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    processors: LogitsProcessorList,
    orders=None,
    guidance: bool = False,
    assistant_model=None,
    num_assistant_tokens: int | None = None,
    jacobi_window: int | None = None,
    acceptance: str = "lossless",
    relax: float = 2.0,
    generator=None,
    stats: SpeculativeStats | None = None,
    prepack_weights: bool = True,
    **kwargs,
) -> torch.LongTensor:
    r"""
    Sample (or greedily decode) all image tokens with a draft model or with speculative Jacobi decoding.

    Called by [`RARForImageGeneration.generate`] with its guidance processor in `processors`; the sampling settings
    (`do_sample`, `temperature`, `top_k`, `top_p`) and `cache_implementation` come from `kwargs` over the model's
    generation config, and are turned into the same warpers plain `generate()` applies.

    Args:
        assistant_model ([`RARForImageGeneration`], *optional*): the draft model.
        num_assistant_tokens (`int`, *optional*, defaults to 4): tokens the draft model proposes per round.
        jacobi_window (`int`, *optional*): speculative Jacobi decoding with this many guessed tokens per pass.
        acceptance (`str`): `"lossless"` (default, exact) or `"relaxed"` (accepts drafts `relax` times more
            readily; faster, NOT exact: the samples drift towards the proposals).
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the random draws.
        stats ([`SpeculativeStats`], *optional*): filled with forward-pass counts.
        prepack_weights (`bool`): run the draft model on prepacked weights on CPU (the caller packs the target's).

    Returns:
        `torch.LongTensor` `(B, 1 + image_seq_len)` in generation order.
    """
    if (assistant_model is None) == (jacobi_window is None):
        raise ValueError("Pass exactly one of assistant_model= (draft model) and jacobi_window= (Jacobi decoding).")
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE_RULES}, got {acceptance!r}.")
    if acceptance == "relaxed" and not relax >= 1.0:
        raise ValueError(f"relax must be >= 1 (1 is the lossless rule), got {relax!r}.")
    unsupported = sorted(set(kwargs) - _SUPPORTED_KWARGS)
    if unsupported:
        raise ValueError(
            f"Speculative decoding does not support generate() argument(s) {unsupported}; it understands "
            f"{sorted(_SUPPORTED_KWARGS)} (and generator=, num_assistant_tokens=, jacobi_window=, acceptance=)."
        )
    length = model.config.image_seq_len
    for name in ("max_new_tokens", "min_new_tokens"):
        if kwargs.get(name) not in (None, length):
            raise ValueError(f"Speculative decoding always generates image_seq_len={length} tokens; got {name}={kwargs[name]}.")
    if kwargs.get("use_cache") is False:
        raise ValueError("Speculative decoding needs the KV cache (use_cache=False is not supported).")
    generation_config, _ = model._prepare_generation_config(None, **{k: v for k, v in kwargs.items() if k != "use_cache"})
    do_sample = bool(generation_config.do_sample)
    # The same processor chain plain generate() builds (our guidance and user processors, then the warpers).
    processors = model._get_logits_processor(
        generation_config, input_ids_seq_length=1, logits_processor=processors, device=input_ids.device, model_kwargs={}
    )
    cache_implementation = generation_config.cache_implementation
    batch_size = input_ids.shape[0]
    drawer = _Drawer(generator, batch_size, input_ids.device)
    stats = stats if stats is not None else SpeculativeStats()
    target = _GuidedModel(model, input_ids, orders, guidance, processors, cache_implementation)
    if assistant_model is not None:
        check_assistant(model, assistant_model)
        window = 4 if num_assistant_tokens is None else num_assistant_tokens
        if type(window) is not int or window < 1:
            raise ValueError(f"num_assistant_tokens must be a positive int, got {num_assistant_tokens!r}.")
        draft = _GuidedModel(assistant_model, input_ids, orders, guidance, processors, cache_implementation)
        with prepacked_linear_weights(assistant_model, draft.rows, enabled=prepack_weights):
            sequence = _draft_model_loop(target, draft, input_ids, window, drawer, acceptance, relax, do_sample, stats)
        stats.draft_forwards += draft.forwards
    else:
        if type(jacobi_window) is not int or jacobi_window < 1:
            raise ValueError(f"jacobi_window must be a positive int, got {jacobi_window!r}.")
        sequence = _jacobi_loop(target, input_ids, jacobi_window, drawer, acceptance, relax, do_sample, stats)
    stats.target_forwards += target.forwards
    stats.tokens += length * batch_size
    return sequence


def _draft_model_loop(target, draft, sequence, window, drawer, acceptance, relax, do_sample, stats):
    length = target.model.config.image_seq_len
    while (n := sequence.shape[1] - 1) < length:
        k = min(window, length - n - 1)  # the step after the last draft must exist
        drafts, q = sequence[:, :0], []
        for i in range(k):
            scores = draft.scores(torch.cat([sequence, drafts], dim=1), n + i + 1, n + i)[:, 0]
            probs = _probabilities(scores, do_sample)
            q.append(probs)
            drafts = torch.cat([drafts, drawer.categorical(probs)[:, None]], dim=1)
        p = _probabilities(target.scores(torch.cat([sequence, drafts], dim=1), n + k + 1, n), do_sample)
        q = torch.stack(q, dim=1) if q else p[:, :0]
        accepted, following = _verify(drafts, q, p, drawer, acceptance, relax, do_sample)
        sequence, m = _commit(sequence, drafts, accepted, following)
        stats.accepted_per_forward.append(m)
        # Entries up to the last kept draft are valid; the newest token is fed next round.
        target.rollback(n + m)
        draft.rollback(n + m)
    return sequence


def _jacobi_loop(target, sequence, window, drawer, acceptance, relax, do_sample, stats):
    length = target.model.config.image_seq_len
    vocab_size = target.model.config.codebook_size
    batch_size = sequence.shape[0]
    device = sequence.device
    uniform = torch.full((batch_size, vocab_size), 1.0 / vocab_size, device=device)
    fresh = uniform  # what brand-new window positions are guessed from
    drafts = sequence[:, :0]
    q = torch.zeros(batch_size, 0, vocab_size, device=device)
    while (n := sequence.shape[1] - 1) < length:
        k = min(window, length - n - 1)
        drafts, q = drafts[:, :k], q[:, :k]
        if drafts.shape[1] < k:
            # Any guess is exact as long as it is drawn from the q it is tested against.
            new_q = fresh[:, None].expand(batch_size, k - drafts.shape[1], vocab_size)
            drafts = torch.cat([drafts, drawer.categorical(new_q.contiguous())], dim=1)
            q = torch.cat([q, new_q], dim=1)
        p = _probabilities(target.scores(torch.cat([sequence, drafts], dim=1), n + k + 1, n), do_sample)
        accepted, following = _verify(drafts, q, p, drawer, acceptance, relax, do_sample)
        sequence, m = _commit(sequence, drafts, accepted, following)
        stats.accepted_per_forward.append(m)
        target.rollback(n + m)
        # The target's distributions after the cut (conditioned on the old guesses) propose the next guesses, drawn
        # afresh: a guess that already passed a test would be biased towards passing.
        q = p[:, m:]
        drafts = drawer.categorical(q) if q.shape[1] else sequence[:, :0]
        # Positions beyond the window are guessed from the target's last distribution (neighbouring image tokens
        # look alike), with a tenth of uniform: a few hundredths more tokens per pass than uniform guesses alone.
        fresh = _FRESH_FROM_LAST * p[:, -1] + (1 - _FRESH_FROM_LAST) * uniform
    return sequence
