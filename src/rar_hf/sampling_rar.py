"""The building blocks RAR's sampling loops share (plain `generate()` in `generation_rar.py`, the speculative loops
in `speculative_rar.py`): guidance schedules and the guidance processor, argument checks, seeded draws and random
orders, the non-finite-logits guard, the per-token step callback, and the layout of a decoding step's model inputs
(`step_inputs`)."""

import math
import numbers
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

GUIDANCE_SCHEDULES = ("constant", "linear", "pow-cosine")
# Sampling settings RAR adds to transformers' GenerationConfig, with the values of a config that lacks them.
RAR_GENERATION_DEFAULTS = {"guidance_schedule": "pow-cosine", "guidance_scale_pow": 0.0}
# generate() arguments of speculative decoding (`rar_hf.speculative_rar`).
SPECULATIVE_ARGUMENTS = ("assistant_model", "jacobi_window", "num_assistant_tokens", "acceptance", "relax", "stats")
# What every spelling of "no class" means: the null (unconditional) class of classifier-free guidance.
UNCONDITIONAL_NAMES = ("none", "unconditional")


def is_unconditional(label) -> bool:
    """Whether a class label asks for the unconditional (null) class: `None`, `-1`, `"none"` or `"unconditional"`
    (any case). The one rule of `generate()`, the pipeline, the CLI and the app."""
    if label is None:
        return True
    if isinstance(label, str):
        return label.strip().lower() in UNCONDITIONAL_NAMES
    return isinstance(label, numbers.Integral) and not isinstance(label, bool) and int(label) == -1


def guidance_scale_at(
    step: int, num_steps: int, guidance_scale: float, schedule: str = "pow-cosine", guidance_scale_pow: float = 0.0
) -> float:
    """Guidance scale used to sample image token `step` (0-based) of `num_steps`.

    - `"constant"`: `guidance_scale` at every step.
    - `"linear"`: from 1 at step 0 to `guidance_scale` at step `num_steps` (the paper's ablations).
    - `"pow-cosine"` (official): `s = (1 - cos((step / num_steps) ** pow * pi)) / 2`, scale = `(g - 1) * s + 1`.
      `pow = 0` gives a constant `g` except at step 0 (0 ** 0 = 1), as the official sampler.
    """
    if schedule == "constant":
        return float(guidance_scale)
    if schedule == "linear":
        return 1.0 + (guidance_scale - 1.0) * step / num_steps
    if schedule == "pow-cosine":
        # Evaluated in float32 as the official sampler, so cfg_scale matches it bit for bit.
        ratio = torch.tensor(step / num_steps, dtype=torch.float32) ** guidance_scale_pow
        scale_step = (1 - torch.cos(ratio * math.pi)) * 0.5
        return float((guidance_scale - 1) * scale_step + 1)
    raise ValueError(f"Unknown guidance schedule {schedule!r}; expected one of {GUIDANCE_SCHEDULES}.")


def guidance_scales(num_steps: int, guidance_scale: float, schedule: str = "pow-cosine", guidance_scale_pow: float = 0.0):
    """The whole schedule as a float32 tensor of `num_steps` scales."""
    return torch.tensor(
        [guidance_scale_at(s, num_steps, guidance_scale, schedule, guidance_scale_pow) for s in range(num_steps)],
        dtype=torch.float32,
    )


class RARClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    r"""
    Classifier-free guidance with a per-step scale, for a batch that the model ran doubled as `[conditional; null]`.

    It receives `2B` rows of logits and returns the `B` guided rows `u + (c - u) * scale(step)`, so that sampling
    draws one token per pair and both halves of the doubled batch always continue with the same token. The step is
    the number of image tokens before the one being sampled, read from the length of `input_ids` (class token first),
    so it works with any cache, with `use_cache=False` and when continuing from a prefix.

    Args:
        guidance_scales (`torch.Tensor`): the scale for every image-token step (see [`guidance_scales`]).
        prompt_length (`int`): entries of `input_ids` before the first image token (1: the class token).
    """

    def __init__(self, guidance_scales: torch.Tensor, prompt_length: int = 1, schedule=None):
        self.guidance_scales = guidance_scales.tolist()
        self.prompt_length = prompt_length
        self.schedule = schedule  # (guidance_scale, schedule name, pow): lets set_guidance_scale rebuild the scales

    def set_guidance_scale(self, guidance_scale: float, from_step: int = 0):
        """Use `guidance_scale` (same schedule) for the steps from `from_step` on: what a pipeline callback that
        changes `pipe._guidance_scale` does to the rest of the image."""
        if self.schedule is None:
            raise ValueError("This guidance processor was built from a table of scales, not a schedule.")
        _, name, power = self.schedule
        check_sampling_arguments(guidance_scale=guidance_scale)
        scales = guidance_scales(len(self.guidance_scales), guidance_scale, name, power).tolist()
        self.guidance_scales[from_step:] = scales[from_step:]
        self.schedule = (guidance_scale, name, power)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch_size = input_ids.shape[0]
        if scores.shape[0] != 2 * batch_size:
            raise ValueError(
                f"Classifier-free guidance expects 2 x {batch_size} rows of logits ([conditional; null]), got "
                f"{scores.shape[0]}: the model must be called through RARForImageGeneration.generate()."
            )
        return self.guide(scores, self.scale_for(input_ids.shape[1]))

    def scale_for(self, length: int) -> float:
        """The scale of the step that continues a sequence of `length` tokens (prompt included)."""
        return self.guidance_scales[min(length - self.prompt_length, len(self.guidance_scales) - 1)]

    @staticmethod
    def guide(scores: torch.Tensor, scale) -> torch.Tensor:
        """`[conditional; null]` rows (along dim 0; any trailing shape) -> guided rows, for a scale or a tensor of them."""
        batch_size = scores.shape[0] // 2
        cond, uncond = scores[:batch_size], scores[batch_size:]
        # Formed as u + (c - u) * s even when s == 1, as the official sampler (bit-level parity).
        return uncond + (cond - uncond) * scale


# ------------------------------------------------------------------------------------------------ argument checks
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_generators(generator, batch_size: int | None = None):
    """A `torch.Generator`, a list of them (one per row: `batch_size` of them) or `None`; else one clear error."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(
            f"generator must be a torch.Generator or a list of them (one per image), got {generator!r}; "
            "for a seed use torch.Generator().manual_seed(seed)."
        )
    if batch_size is not None and len(generator) != batch_size:
        raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}: pass one per row, or one.")


def check_sampling_arguments(
    guidance_scale=None,
    guidance_schedule: str | None = None,
    guidance_scale_pow=None,
    temperature=None,
    top_k=None,
    top_p=None,
    generator=None,
    batch_size: int | None = None,
):
    r"""
    Check the sampling arguments of [`RARGenerationMixin.generate`] and [`RARPipeline`] before any compute.
    `None` means "not given" (the generation config's default applies) and is always accepted.

    Raises:
        ValueError: a NaN, infinite or negative guidance scale, a NaN/infinite/negative `guidance_scale_pow`, an
            unknown schedule (checked even when guidance is off), a temperature that is not a positive finite number,
            a negative `top_k`, a `top_p` outside (0, 1], or a generator list whose length is not `batch_size`.
        TypeError: a value of the wrong type, e.g. `generator=123` (a `torch.Generator` or a list of them is expected).
    """

    def number(name, value, minimum, strict=False, integer=False):
        if value is None:
            return
        if integer:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}.")
        elif not _is_real(value):
            raise TypeError(f"{name} must be a number, got {value!r}.")
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")

    number("guidance_scale", guidance_scale, 0)
    number("guidance_scale_pow", guidance_scale_pow, 0)
    number("temperature", temperature, 0, strict=True)
    number("top_k", top_k, 0, integer=True)
    if top_p is not None:
        if not _is_real(top_p):
            raise TypeError(f"top_p must be a number in (0, 1], got {top_p!r}.")
        if not 0.0 < top_p <= 1.0:  # also false for NaN
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if guidance_schedule is not None and guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"Unknown guidance schedule {guidance_schedule!r}; expected one of {GUIDANCE_SCHEDULES}.")
    check_generators(generator, batch_size)


# ------------------------------------------------------------------------------------------------ seeded sampling
def _per_row(generator, batch_size: int) -> list:
    return list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch_size


def uniform_draws(shape: tuple, generator=None, device=None) -> torch.Tensor:
    """`shape` uniforms in [0, 1), `shape[0]` rows, from one generator for the batch, one per row (each row then
    depends only on its own), or torch's global RNG (`None`); moved to `device`.

    Drawn on each generator's own device (as diffusers' randn_tensor does), so a CPU generator makes the same draws
    whatever device the model runs on.
    """
    if isinstance(generator, (list, tuple)):
        check_generators(generator, shape[0])
        draws = torch.stack([torch.rand(shape[1:], generator=g, device=g.device) for g in generator])
    elif generator is not None:
        draws = torch.rand(shape, generator=generator, device=generator.device)
    else:
        draws = torch.rand(shape, device=device)
    return draws.to(device)


def random_orders(batch_size: int, length: int, generator=None, device=None) -> torch.LongTensor:
    """One random generation order (a permutation of `[0, length)`) per row, drawn from that row's generator (or
    from torch's global RNG when `generator` is `None`), on each generator's device, then moved to `device`."""
    orders = [
        torch.randperm(length, generator=g, device=g.device if g is not None else None)
        for g in _per_row(generator, batch_size)
    ]
    return torch.stack([order.to(device) for order in orders])


class RARSamplingLogitsProcessor(LogitsProcessor):
    r"""
    Draws the next token with the caller's random generator(s) and returns scores that are `-inf` everywhere except
    at the drawn token, so that `generate(do_sample=False)` (greedy) emits exactly that token.

    transformers' own sampling (`do_sample=True`) draws from the global RNG with `torch.multinomial`, and its
    temperature / top-k / top-p warpers run after every custom processor, so a processor cannot both see the warped
    distribution and control the draw. This one does both: it applies the warpers in generate's order (temperature,
    top-k, top-p) and then draws with the Gumbel-max trick, `argmax(scores + Gumbel noise)`, which samples from
    `softmax(scores)`. [`RARGenerationMixin.generate`] uses it whenever a `generator` is given.

    Args:
        generator (`torch.Generator`, `list[torch.Generator]` or `None`): one generator for the whole batch (the
            draws depend on the batch layout), one per row (each row's draws depend only on its own generator), or
            `None` for torch's global RNG.
        temperature (`float`, defaults to 1.0): softmax temperature.
        top_k (`int`, *optional*): keep only the `top_k` most likely tokens (0 or `None`: all).
        top_p (`float`, *optional*): keep the smallest set of tokens whose probability reaches `top_p`.
        keep_scores (`bool`, defaults to `False`): keep each step's warped scores in `self.scores` (what
            `output_scores=True` should report, rather than the one-hot rows returned to generate).
    """

    def __init__(self, generator=None, temperature=1.0, top_k=None, top_p=None, keep_scores: bool = False):
        check_sampling_arguments(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.generator = generator
        self.warpers = LogitsProcessorList()
        if temperature is not None and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.scores = [] if keep_scores else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.warpers(input_ids, scores)
        if self.scores is not None:
            self.scores.append(scores)
        uniform = uniform_draws(tuple(scores.shape), self.generator, scores.device)
        # torch.rand is in [0, 1): a 0 gives -inf noise (that token is skipped), never NaN.
        tokens = (scores - torch.log(-torch.log(uniform))).argmax(dim=-1)
        drawn = torch.full_like(scores, -float("inf"))
        return drawn.scatter_(1, tokens[:, None], 0.0)


# ------------------------------------------------------------------------------------------------ non-finite logits
class NonFiniteLogitsError(ValueError):
    """The model's logits held NaN or inf during sampling (bad weights or a dtype overflow)."""


NON_FINITE_LOGITS_MESSAGE = (
    "The model produced non-finite logits (NaN or inf) while sampling{where}, so every token drawn from them would be "
    "meaningless. Likely causes: NaN/inf in the weights (a corrupted or badly converted checkpoint, a diverged "
    "training run) or an overflow of the compute dtype (float16: use bfloat16 or float32)."
)


class RARFiniteLogitsCheck(LogitsProcessor):
    r"""
    Guards sampling against non-finite logits (without it, NaN logits silently become token 0 everywhere).

    It runs first, on the model's raw logits, and reduces them to their largest magnitude (NaN and inf propagate
    through it): three small kernels per step. On a CPU it raises at the first bad step. On an accelerator it only
    keeps the running largest magnitude on the device (no host synchronisation per step);
    [`RARGenerationMixin.generate`] calls [`raise_if_non_finite`] after the loop.

    Args:
        defer (`bool`, *optional*): force the deferred (`True`) or the immediate (`False`) check; by default
            immediate on a CPU only.
    """

    def __init__(self, defer: bool | None = None):
        self.defer = defer
        self.largest = None  # deferred: the largest |logit| so far (NaN once any logit was NaN)

    def deferred(self, scores: torch.Tensor) -> bool:
        return scores.device.type != "cpu" if self.defer is None else self.defer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        largest = scores.abs().amax()  # NaN if any logit is NaN, inf if any is infinite
        if not self.deferred(scores):
            if not largest < math.inf:
                step = input_ids.shape[1] - 1
                raise NonFiniteLogitsError(NON_FINITE_LOGITS_MESSAGE.format(where=f" (image token {step})"))
        else:
            self.largest = largest if self.largest is None else torch.maximum(self.largest, largest)
        return scores

    def raise_if_non_finite(self):
        if self.largest is not None and not self.largest < math.inf:
            raise NonFiniteLogitsError(NON_FINITE_LOGITS_MESSAGE.format(where=""))


# The processors of the current generate() call (per thread): its finite checks, raised on after the loop, and its
# guidance processors, which a pipeline callback may re-scale (see `active_guidance_processors`).
_CALL_PROCESSORS: ContextVar[list | None] = ContextVar("rar_call_processors", default=None)


def active_guidance_processors() -> list:
    """The guidance processors of the `generate()` call running in this thread (for step callbacks)."""
    processors = _CALL_PROCESSORS.get() or []
    return [p for p in processors if isinstance(p, RARClassifierFreeGuidanceLogitsProcessor)]


# ------------------------------------------------------------------------------------------------ step callback
class RARStepCallback(StoppingCriteria):
    r"""
    Calls `callback(step, tokens)` once per generated token, lets it replace the tokens generated so far, and stops
    generation when `should_stop()` turns true. What [`RARPipeline`]'s `callback_on_step_end` and progress bar run on,
    in plain and in speculative decoding alike.

    In plain decoding it runs as a stopping criterion, right after generate appended the new token: `step` is that
    token's index among the image tokens (0-based, prefix included) and `tokens` a copy of the `(batch, step + 1)`
    image tokens so far, in generation order. When the callback returns a different tensor, it is written into the
    sequence, so the model continues from it: a change to the newest token only is free (that token is not in the KV
    cache yet); a change to an older one makes the next step re-run the model from the first changed token (see
    `rewind_to`, which `prepare_inputs_for_generation` and the speculative loops consume, cropping the cache there).

    Args:
        callback (`Callable[[int, torch.LongTensor], torch.LongTensor | None]`): `None` keeps the tokens.
        codebook_size (`int`): replacement tokens must lie in `[0, codebook_size)`.
        should_stop (`Callable[[], bool]`, *optional*): checked after the callback; `True` ends generation there.
        prompt_length (`int`, defaults to 1): the class token.
    """

    def __init__(self, callback, codebook_size: int, should_stop=None, prompt_length: int = 1):
        self.callback = callback
        self.codebook_size = codebook_size
        self.should_stop = should_stop
        self.prompt_length = prompt_length
        self.rewind_to = None
        self._answers = {}  # (rows, device, stop) -> the bool tensor returned to generate (never modified there)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        stop = self.after_token(input_ids)
        key = (input_ids.shape[0], input_ids.device, stop)
        if key not in self._answers:  # made once per call: no new tensor per step
            self._answers[key] = torch.full(key[:1], stop, dtype=torch.bool, device=input_ids.device)
        return self._answers[key]

    def after_token(self, input_ids: torch.LongTensor) -> bool:
        """Run the callback for the newest token of `input_ids` (edited in place); whether to stop."""
        tokens = input_ids[:, self.prompt_length :]  # a view: writing to it edits the sequence
        step = tokens.shape[1] - 1
        replaced = self.callback(step, tokens.clone())
        if replaced is not None:
            self._apply(tokens, replaced, step)
        return bool(self.should_stop()) if self.should_stop is not None else False

    def _apply(self, tokens: torch.LongTensor, replaced, step: int):
        if not isinstance(replaced, torch.Tensor) or replaced.is_floating_point() or replaced.is_complex():
            raise TypeError(f"The step callback must return an integer tensor of tokens, got {replaced!r}.")
        if tuple(replaced.shape) != tuple(tokens.shape):
            raise ValueError(
                f"The step callback returned tokens of shape {tuple(replaced.shape)} at step {step}; expected "
                f"{tuple(tokens.shape)} (batch, step + 1)."
            )
        replaced = replaced.to(tokens.device)
        if ((replaced < 0) | (replaced >= self.codebook_size)).any():
            raise ValueError(f"The step callback returned tokens outside [0, {self.codebook_size}) at step {step}.")
        changed = (replaced != tokens).any(dim=0).nonzero()
        if changed.numel() == 0:
            return
        tokens.copy_(replaced)
        first = int(changed[0])
        if first < step:  # already in the KV cache
            self.rewind_to = first if self.rewind_to is None else min(self.rewind_to, first)

    def pop_rewind(self) -> int | None:
        """The first cached token index that was replaced since the last call, or `None`; resets it."""
        rewind, self.rewind_to = self.rewind_to, None
        return rewind


# ------------------------------------------------------------------------------------------------ step inputs
class RARModulationCache:
    r"""
    AdaLN modulations of every layer, precomputed for the rows of one generation, a chunk of slots at a time.

    A row's condition is fixed for the whole sequence and the slots ahead are known, so the modulations of the next
    `chunk_size` slots come from one batched matmul per layer instead of one skinny matmul per layer and step, and
    rows that share a condition (every null row of classifier-free guidance) share the work. When a step is bound by
    reading the weights, this removes a third of the bytes read per step. The tables of all layers sit side by side
    in one tensor, so a step gathers its rows' modulations with one indexing op whatever the depth (each layer gets
    a view). `generate()` creates one per call, which also keeps the call's per-row condition ids (fixed for the
    call: made once, not once per step).
    """

    def __init__(self, chunk_size: int = 32):
        self.chunk_size = chunk_size
        self.unique_ids, self.inverse = None, None
        self.chunk_start, self.chunk_table, self.widths = 0, None, None
        self.row_condition_ids = None

    def condition_ids(self, sequence: torch.LongTensor, guidance: bool, null_id: int) -> torch.LongTensor:
        """The class token of every row the model runs (`[conditional; null]` with guidance), made on first use."""
        if self.row_condition_ids is None:
            self.row_condition_ids = row_condition_ids(sequence, guidance, null_id)
        return self.row_condition_ids

    @torch.no_grad()
    def modulations(self, model, condition_ids: torch.LongTensor, start: int, length: int):
        """Per-layer (and final) modulations of slots `[start, start + length)` of every row (`model`: a RARModel)."""
        if self.inverse is None:
            self.unique_ids, self.inverse = torch.unique(condition_ids, return_inverse=True)
        covered = self.chunk_start <= start and start + length <= self.chunk_start + self.chunk_size
        if self.chunk_table is None or not covered:
            num_slots = model.config.image_seq_len + 2
            self.chunk_start = start
            slots = torch.arange(start, min(num_slots, start + max(self.chunk_size, length)), device=self.inverse.device)
            condition = F.silu(model.embed_tokens(self.unique_ids)[:, None] + model.condition_position_embedding[slots])
            linears = [layer.adaln_modulation for layer in model.layers] + [model.final_adaln_modulation]
            self.widths = [linear.out_features for linear in linears]
            self.chunk_table = None  # free the previous chunk's table first
            table = condition.new_empty(*condition.shape[:2], sum(self.widths))
            for linear, part in zip(linears, table.split(self.widths, dim=-1)):
                part.copy_(linear(condition))  # each layer's own product, as without the shared table
            self.chunk_table = table
        offset = start - self.chunk_start
        rows = self.chunk_table[self.inverse, offset : offset + length]  # one gather for every layer
        return list(rows.split(self.widths, dim=-1))


def row_condition_ids(sequence: torch.LongTensor, guidance: bool, null_id: int) -> torch.LongTensor:
    """The class token of every row the model runs for `sequence` (class token first): `[conditional; null]` rows
    with guidance."""
    condition_ids = sequence[:, 0].clone(memory_format=torch.contiguous_format)
    if guidance:
        condition_ids = torch.cat([condition_ids, torch.full_like(condition_ids, null_id)])
    return condition_ids


def step_inputs(model, sequence: torch.LongTensor, fed: int, guidance: bool, modulation_cache=None) -> dict:
    r"""
    The `forward()` inputs that feed `sequence[:, fed:]` to `model`, where `sequence` is `(B, 1 + n)`: the class token
    then `n` image tokens in generation order, and the cache holds the first `fed` entries (plus the cls slot).

    The one place that lays out a decoding step, for plain `generate()` (`prepare_inputs_for_generation`) and the
    speculative loops alike: `fed == 0` starts the sequence (the model prepends its cls slot); with guidance the
    rows are doubled as `[conditional; null]` (the null rows take the null class token); `position_ids` are the
    entries' indices in the sequence. Returns `input_ids`, `condition_ids`, `position_ids`, `starts_sequence` and
    `modulations` (with a [`RARModulationCache`], which also keeps the call's condition ids). `orders` are not
    included: pass them with as many rows as the model runs.

    A decoding step launches three small kernels here (the new tokens, their positions, one gather of the
    modulations), however deep the model and whether or not guidance doubles the rows.
    """
    null_id = model.config.null_class_id
    starts_sequence = fed == 0
    # Copies, not views of a sequence that grows every step: fixed strides keep a compiled forward from recompiling.
    if guidance:
        new = sequence[:, fed:].repeat(2, 1)  # [conditional; null] rows in one copy
        if starts_sequence:
            new[sequence.shape[0] :, 0] = null_id
    else:
        new = sequence[:, fed:].clone(memory_format=torch.contiguous_format)
    if modulation_cache is not None:
        condition_ids = modulation_cache.condition_ids(sequence, guidance, null_id)
    else:
        condition_ids = row_condition_ids(sequence, guidance, null_id)
    position_ids = torch.arange(fed, sequence.shape[1], device=sequence.device)
    modulations = None
    if modulation_cache is not None:
        first_slot = 0 if starts_sequence else fed + 1  # slot 0 is the cls slot
        num_slots = new.shape[1] + (1 if starts_sequence else 0)
        modulations = modulation_cache.modulations(model.model, condition_ids, first_slot, num_slots)
    return dict(
        input_ids=new,
        condition_ids=condition_ids,
        position_ids=position_ids,
        starts_sequence=starts_sequence,
        modulations=modulations,
    )


def cached_entries(cache) -> int:
    """Entries of the sequence (class token, image tokens) a RAR cache holds: its length minus the cls slot."""
    return max(int(cache.get_seq_length()) - 1, 0) if cache is not None else 0


def cache_rows(cache) -> int | None:
    """Rows (batch) of a filled transformers cache, or `None` when it holds nothing yet."""
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.numel():
            return keys.shape[0]
    return None


def cache_room(cache) -> int | None:
    """Slots a static (fixed-size) cache can hold, or `None` for a cache that grows."""
    lengths = [getattr(layer, "max_cache_len", None) for layer in getattr(cache, "layers", ())]
    lengths = [length for length in lengths if isinstance(length, int) and length > 0]
    return min(lengths) if lengths and getattr(cache, "is_compileable", False) else None
