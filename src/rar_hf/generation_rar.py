"""How RAR samples: [`RARGenerationMixin`] (the model's `generate()`), its guidance schedules and processor, argument
checks, seeded draws, generation orders, prefixes and the per-token step callback.

RAR runs inside transformers' own generation loop, with three things of its own:

- **Classifier-free guidance on a schedule.** With a guidance scale `g != 1` every step runs the doubled batch
  `[conditional; null]` (`step_inputs`), and [`RARClassifierFreeGuidanceLogitsProcessor`] turns its `2B` rows of
  logits into `B` guided rows with the scale of that token's step (constant, linear or the official pow-cosine).
  It runs first, so every other processor (repetition penalty, bad words, temperature, top-k/p, ...) sees one row per
  image.
- **Generation orders.** `orders=` (a scan order, random, or a permutation per row) is forwarded to the model, whose
  target-aware position embedding tells each slot which position it predicts; `generate()` returns raster order.
- **Prefixes.** `input_ids` `(B, 1 + k)` continues from `k` known image tokens (read in one prefill) and, with
  `cache=` from an earlier call, from its keys and values.

`model.generation_config` is the one source of sampling defaults: `guidance_scale`, `guidance_schedule`,
`guidance_scale_pow`, `temperature`, `top_k`, `top_p`, `do_sample`.
"""

import copy
import numbers

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList

from .sampling_rar import (  # noqa: F401  (re-exported: the public names of RAR's sampling)
    _CALL_PROCESSORS,
    GUIDANCE_SCHEDULES,
    RAR_GENERATION_DEFAULTS,
    SPECULATIVE_ARGUMENTS,
    NonFiniteLogitsError,
    RARClassifierFreeGuidanceLogitsProcessor,
    RARFiniteLogitsCheck,
    RARModulationCache,
    RARSamplingLogitsProcessor,
    RARStepCallback,
    active_guidance_processors,
    cache_room,
    cache_rows,
    cached_entries,
    check_generators,
    check_sampling_arguments,
    guidance_scale_at,
    guidance_scales,
    is_unconditional,
    random_orders,
    step_inputs,
    uniform_draws,
)
from .speculative_rar import speculative_generate

# ------------------------------------------------------------------------------------------------ the mixin
class RARGenerationMixin(GenerationMixin):
    r"""
    `generate()` for RAR: transformers' generation loop, caches and processors, with classifier-free guidance on a
    schedule, generation orders, prefixes, seeded draws, a per-token step callback and speculative decoding
    (`assistant_model=`, `jacobi_window=`; see `rar_hf.speculative_rar`).
    """

    # ------------------------------------------------------------------------------------------- configuration
    @staticmethod
    def default_generation_config(config) -> GenerationConfig:
        """The sampling defaults of a model built from `config`: the official sampler's settings, and the guidance
        settings a legacy config carried in `sampling_defaults` (or a preset's)."""
        legacy = getattr(config, "legacy_sampling_defaults", None) or {}
        return GenerationConfig(
            do_sample=True,
            top_k=0,
            temperature=legacy.get("temperature", 1.0),
            guidance_scale=legacy.get("guidance_scale", 1.0),
            guidance_schedule=legacy.get("guidance_schedule", RAR_GENERATION_DEFAULTS["guidance_schedule"]),
            guidance_scale_pow=legacy.get("guidance_scale_pow", RAR_GENERATION_DEFAULTS["guidance_scale_pow"]),
            num_assistant_tokens=4,
            # Every sequence has exactly 1 + image_seq_len slots: a preallocated cache, no per-step reallocation.
            cache_implementation="static",
        )

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        # Folders written before the sampling defaults moved into generation_config.json kept them in config.json
        # (`sampling_defaults`): what the loaded generation config lacks comes from there.
        defaults = self.default_generation_config(self.config)
        for name in ("guidance_scale", *RAR_GENERATION_DEFAULTS):
            if getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, getattr(defaults, name))
        for name in ("max_new_tokens", "min_new_tokens"):  # old files: a whole image (now: what the prompt leaves)
            if getattr(self.generation_config, name, None) == self.config.image_seq_len:
                setattr(self.generation_config, name, None)

    # ------------------------------------------------------------------------------------------------ prompts
    def prepare_class_ids(self, class_labels, device=None) -> torch.LongTensor:
        """Turn class labels (ints, numpy or torch integers; `None`, `-1`, `"none"` or `"unconditional"` for the
        unconditional class) into the `(B, 1)` prompt ids of `generate()`. Names of classes are the pipeline's job
        (`RARPipeline.get_label_ids`)."""
        config = self.config
        if isinstance(class_labels, (numbers.Integral, str)) or class_labels is None:
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor) or type(class_labels).__module__ == "numpy":
            class_labels = class_labels.flatten().tolist() if class_labels.ndim else [class_labels.item()]
        ids = []
        for label in class_labels:
            if is_unconditional(label):
                ids.append(config.null_class_id)
                continue
            if isinstance(label, numbers.Integral) and not isinstance(label, bool):
                label = int(label)  # numpy integers compare and format like ints from here on
            if type(label) is not int or not 0 <= label < config.num_classes:
                raise ValueError(
                    f"Class label {label!r} is out of range: expected an int in [0, {config.num_classes}), or None, -1, "
                    "'none' or 'unconditional' for the unconditional (null) class."
                )
            ids.append(config.codebook_size + 1 + label)
        return torch.tensor(ids, dtype=torch.long, device=device or self.device)[:, None]

    def _resolve_orders(self, orders, batch_size: int, device, generator=None) -> torch.LongTensor | None:
        if orders is None or (isinstance(orders, str) and orders == "raster"):
            return None
        length = self.config.image_seq_len
        if isinstance(orders, str):
            if orders == "random":
                return random_orders(batch_size, length, generator, device)
            from .data.scan_orders import get_scan_order

            height, width = self.config.latent_size
            return get_scan_order(orders, height, width).to(device).expand(batch_size, -1).contiguous()
        orders = torch.as_tensor(orders, dtype=torch.long, device=device)
        if orders.dim() == 1:
            orders = orders.expand(batch_size, -1).contiguous()
        return orders

    def _resolve_lengths(self, generation_config: GenerationConfig, kwargs: dict, prompt_tokens: int):
        """Set the call's `max_new_tokens`/`min_new_tokens`: by default the rest of the image; more than that is an
        error before any compute."""
        left = self.config.image_seq_len - prompt_tokens
        explicit = {}
        for name, offset in (("max_new_tokens", 0), ("min_new_tokens", 0), ("max_length", 1 + prompt_tokens),
                             ("min_length", 1 + prompt_tokens)):  # fmt: skip
            if kwargs.get(name) is not None:
                explicit[name.replace("length", "new_tokens")] = (name, kwargs[name] - offset)
        for key in ("max_new_tokens", "min_new_tokens"):
            if key not in explicit and getattr(generation_config, key) is not None:
                explicit[key] = (key, min(getattr(generation_config, key), left))  # a saved config's default: clipped
        for key, (name, value) in explicit.items():
            if value > left:
                raise ValueError(
                    f"{key}={value} (from {name}={kwargs.get(name, value)}) asks for more image tokens than the prompt "
                    f"leaves: image_seq_len={self.config.image_seq_len} minus {prompt_tokens} given. Pass at most {left} "
                    "(fewer give a partial image)."
                )
        max_new = explicit.get("max_new_tokens", (None, left))[1]
        generation_config.max_new_tokens = max_new
        generation_config.max_length = None
        generation_config.min_length = 0
        generation_config.min_new_tokens = explicit["min_new_tokens"][1] if "min_new_tokens" in explicit else None
        return max_new

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        class_labels=None,
        orders=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        step_callback: RARStepCallback | None = None,
        logits_processor: LogitsProcessorList | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ):
        r"""
        Sample image tokens with transformers' generation loop and caches, continuing from the class token (and any
        image tokens given after it) to the end of the image.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, 1 + k)`, *optional*): the class token of each row (see
                [`prepare_class_ids`]), then `k >= 0` known image tokens in generation order (with `orders`, the tokens
                at raster positions `orders[:, :k]`), read in one forward pass before sampling the rest. The guidance
                schedule continues at step `k`, as in a full run.
            class_labels (`list[int | None]`, *optional*): class ids instead of `input_ids` (`None`, `-1`, `"none"`,
                `"unconditional"`: unconditional).
            guidance_scale (`float`, *optional*): classifier-free guidance scale `g`; `g != 1` runs one doubled batch
                `[conditional; null]` per step and both rows of a pair get the same token.
            guidance_schedule (`str`, *optional*): `"pow-cosine"` (official), `"linear"` or `"constant"`.
            guidance_scale_pow (`float`, *optional*): exponent of the pow-cosine schedule.
            temperature, top_k, top_p, do_sample: as in transformers. These five and the three above default to
                `model.generation_config` (saved as `generation_config.json`; the paper's values for converted models).
            orders (`str` or `torch.LongTensor`, *optional*): generation order: `"raster"` (default), `"random"`, a
                scan order name (see `rar_hf.data.scan_orders`) or a `(B, image_seq_len)` permutation tensor.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the source of every random draw of
                the call: the random orders (`orders="random"`) and each sampled token (with the temperature, top-k
                and top-p of the call), so the same generator state gives the same tokens whatever the global RNG did
                meanwhile. One generator per row makes each row depend only on its own. `None`: torch's global RNG
                and transformers' own sampling. With `do_sample=False` only the orders are random.
            step_callback ([`RARStepCallback`], *optional*): called after every generated token (also in speculative
                decoding, once per kept token); it can replace the tokens generated so far (the model continues from
                the replacement) and stop generation early.
            cache (`transformers.Cache`, *optional*): the cache returned by an earlier call
                (`return_dict_in_generate=True`), to continue from it: `input_ids` is then that call's `sequences`
                (generation order), optionally followed by more known tokens.
            assistant_model ([`RARForImageGeneration`], *optional*) / jacobi_window (`int`, *optional*) /
                prompt_lookup_num_tokens (`int`, *optional*): speculative decoding with a draft model, Jacobi guesses
                or n-grams of the image so far (see `rar_hf.speculative_rar`), with `num_assistant_tokens`,
                `max_matching_ngram_size`, `acceptance`, `relax`.
            kwargs: the rest of transformers' `generate()` arguments (`max_new_tokens`, `cache_implementation`,
                `use_cache`, `return_dict_in_generate`, `output_scores`, `output_logits`, `repetition_penalty`,
                `bad_words_ids`, `logits_processor`, `stopping_criteria`, `streamer`, `compile_config`, ...).

        Returns:
            `torch.LongTensor` `(B, 1 + k + n)` (or a `GenerateDecoderOnlyOutput`): the class token then the image
            tokens **in raster order** whatever the generation order (positions not generated, with `orders` and a
            partial image, are `-1`). `scores[s]` (with `output_scores=True`) are the guided, temperature-scaled
            scores from which the `s`-th new token was drawn (`B` rows); `logits`, `hidden_states` and `attentions`
            are the model's raw outputs of each step (`2B` rows `[conditional; null]` with guidance; the first step
            runs the cls slot and the prompt). Beam search runs without guidance only.
        """
        if input_ids is None and class_labels is None:
            raise ValueError("Pass class_labels (class ids, None for unconditional) or input_ids (class tokens first).")
        if input_ids is not None and class_labels is not None:
            raise ValueError("Pass either class_labels or input_ids, not both.")
        if input_ids is None:
            input_ids = self.prepare_class_ids(class_labels)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, 1 + k) tensor of token ids, got {input_ids!r}.")
        input_ids = input_ids.to(self.device)
        batch_size, prompt_tokens = input_ids.shape[0], input_ids.shape[1] - 1
        if kwargs.get("attention_mask") is not None:
            mask = kwargs.pop("attention_mask")
            if tuple(mask.shape) != tuple(input_ids.shape) or not bool(mask.all()):
                raise ValueError(
                    "RAR does not take a padding attention_mask: every row of input_ids is a class token and the same "
                    "number of image tokens. Pass no attention_mask (or all ones of input_ids' shape)."
                )
        speculative = {name: kwargs.pop(name, None) for name in SPECULATIVE_ARGUMENTS}
        speculative = {name: value for name, value in speculative.items() if value is not None}

        rar_options = {name: kwargs.pop(name) for name in RAR_GENERATION_DEFAULTS if name in kwargs}
        explicit = set(kwargs)
        # Defaults that do not apply to this call are set to transformers' neutral values, so that its config
        # validation does not warn about settings the user never made (a saved temperature in greedy mode, the
        # default static cache when a cache is passed or use_cache=False).
        if kwargs.get("do_sample") is False:
            for name, value in {"temperature": 1.0, "top_k": 50, "top_p": 1.0}.items():
                kwargs.setdefault(name, value)
        if kwargs.get("cache") is not None or kwargs.get("use_cache") is False:
            kwargs.setdefault("cache_implementation", None)
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        generation_config._rar_resolved = True  # see _prepare_generation_config
        for name, value in rar_options.items():
            if value is not None:
                setattr(generation_config, name, value)
        if generation_config.prompt_lookup_num_tokens is not None:  # transformers' name (a generation config field)
            speculative["prompt_lookup_num_tokens"] = generation_config.prompt_lookup_num_tokens
            generation_config.prompt_lookup_num_tokens = None
        if speculative and not {"assistant_model", "jacobi_window", "prompt_lookup_num_tokens"} & set(speculative):
            raise ValueError(
                f"{sorted(speculative)} only apply to speculative decoding: pass assistant_model=, jacobi_window= or "
                "prompt_lookup_num_tokens=."
            )
        for name, value in {"guidance_scale": 1.0, **RAR_GENERATION_DEFAULTS}.items():
            if getattr(generation_config, name, None) is None:
                setattr(generation_config, name, value)

        # 1. Check everything before any compute.
        check_sampling_arguments(
            generation_config.guidance_scale, generation_config.guidance_schedule,
            generation_config.guidance_scale_pow, generation_config.temperature, generation_config.top_k,
            generation_config.top_p, generator, batch_size,
        )  # fmt: skip
        guidance = generation_config.guidance_scale != 1.0
        num_beams = generation_config.num_beams or 1
        if num_beams > 1 and guidance:
            raise ValueError(
                f"Beam search (num_beams={num_beams}) cannot run with classifier-free guidance: guidance merges the "
                "[conditional; null] rows into one set of scores per image, which beam search cannot reorder. Pass "
                "guidance_scale=1.0 to beam-search the conditional model."
            )
        if num_beams > 1 and orders is not None:
            raise ValueError(f"Beam search (num_beams={num_beams}) runs in raster order only (orders=None).")
        orders = self._resolve_orders(orders, batch_size, input_ids.device, generator)
        self.check_inputs(input_ids, orders)
        if orders is not None and self.model.target_aware_position_embedding is None:
            raise ValueError(
                "This model's target-aware position embedding was folded into its position embedding for raster "
                "order; it cannot generate in other orders (pass orders=None)."
            )
        max_new = self._resolve_lengths(generation_config, {k: kwargs[k] for k in explicit}, prompt_tokens)
        cache = model_kwargs.get("cache")
        if cache is not None:
            rows, fed = cache_rows(cache), cached_entries(cache)
            expected = batch_size * (2 if guidance else 1)
            if rows is not None and rows != expected:
                raise ValueError(
                    f"The cache holds {rows} rows but this call runs {expected} ({batch_size} images"
                    f"{' x 2 for guidance' if guidance else ''}): continue with the guidance setting and batch of the "
                    "call that made it."
                )
            room = cache_room(cache)
            if room is not None and room < prompt_tokens + 1 + max_new:
                raise ValueError(
                    f"The static cache has room for {room} slots but this call needs {prompt_tokens + 1 + max_new} (the "
                    "cls slot, the class token and the image tokens): pass max_cache_len=<1 + image_seq_len> to the call "
                    "that creates it, or use cache_implementation='dynamic'."
                )
            if fed > input_ids.shape[1]:
                raise ValueError(
                    f"The cache holds {fed} entries of the sequence but input_ids only {input_ids.shape[1]}: pass the "
                    "earlier call's sequences (in generation order), optionally followed by more known tokens."
                )
        if max_new == 0:  # nothing left to generate: the prompt is a whole image
            return self._to_raster(input_ids, orders, self._no_new_tokens_output(generation_config, input_ids, cache))

        # 2. Run: speculative loops, or transformers' own.
        model_orders = torch.cat([orders, orders]) if orders is not None and guidance else orders
        call_processors = []
        token = _CALL_PROCESSORS.set(call_processors)
        try:
            if speculative:
                if num_beams > 1:
                    raise ValueError("Speculative decoding (assistant_model=, jacobi_window=) samples one beam.")
                outputs = speculative_generate(
                    self, input_ids, generation_config, model_kwargs, guidance=guidance, orders=model_orders,
                    generator=generator, step_callback=step_callback, logits_processor=logits_processor, **speculative,
                )  # fmt: skip
            else:
                outputs = self._generate_plain(
                    input_ids, generation_config, model_kwargs, guidance, model_orders, generator, step_callback,
                    logits_processor,
                )  # fmt: skip
        finally:
            _CALL_PROCESSORS.reset(token)
        for check in call_processors:
            if isinstance(check, RARFiniteLogitsCheck):
                check.raise_if_non_finite()
        return self._to_raster(input_ids, orders, outputs)

    def _generate_plain(self, input_ids, generation_config, model_kwargs, guidance, orders, generator, step_callback,
                        logits_processor):  # fmt: skip
        processors = LogitsProcessorList(logits_processor or [])
        sampler = None
        if generator is not None and generation_config.do_sample:
            # transformers samples from the global RNG: draw in a processor instead, and let greedy read the draw.
            sampler = RARSamplingLogitsProcessor(
                generator, generation_config.temperature, generation_config.top_k, generation_config.top_p,
                keep_scores=bool(generation_config.output_scores and generation_config.return_dict_in_generate),
            )  # fmt: skip
            processors.append(sampler)
            generation_config.do_sample = False  # the sampler has drawn: greedy emits its draw
            generation_config.temperature, generation_config.top_k, generation_config.top_p = 1.0, 50, 1.0
        if step_callback is not None:
            criteria = model_kwargs.pop("stopping_criteria", None) or []
            model_kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, step_callback])
        outputs = GenerationMixin.generate(
            self,
            input_ids,
            generation_config=generation_config,
            logits_processor=processors,
            orders=orders,
            guidance=guidance,
            modulation_cache=RARModulationCache(),
            step_callback=step_callback,
            **model_kwargs,
        )
        if sampler is not None and sampler.scores is not None and not isinstance(outputs, torch.Tensor):
            outputs.scores = tuple(sampler.scores)  # the distributions drawn from, not the one-hot rows
        return outputs

    def _no_new_tokens_output(self, generation_config, input_ids, cache):
        if not generation_config.return_dict_in_generate:
            return input_ids.clone()
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        def empty(flag):
            return () if getattr(generation_config, flag) else None

        return GenerateDecoderOnlyOutput(
            sequences=input_ids.clone(), scores=empty("output_scores"), logits=empty("output_logits"),
            attentions=empty("output_attentions"), hidden_states=empty("output_hidden_states"), cache=cache,
        )  # fmt: skip

    def _to_raster(self, input_ids, orders, outputs):
        """Generation order -> raster order (`-1` at positions not generated)."""
        if orders is None:
            return outputs
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        batch_size = input_ids.shape[0]
        raster = torch.full((batch_size, 1 + self.config.image_seq_len), -1, dtype=sequences.dtype, device=sequences.device)
        raster[:, :1] = sequences[:, :1]
        raster[:, 1:].scatter_(1, orders[:batch_size, : sequences.shape[1] - 1], sequences[:, 1:])
        if isinstance(outputs, torch.Tensor):
            return raster
        outputs.sequences = raster
        return outputs

    # ------------------------------------------------------------------------------------------- transformers hooks
    def _prepare_generation_config(self, generation_config, **kwargs):
        # generate() resolves the call's config once (RAR's defaults, lengths, neutral values for what does not
        # apply); transformers' loop must take it as it is rather than refill its unset fields from the model's.
        if generation_config is not None and getattr(generation_config, "_rar_resolved", False):
            model_kwargs = dict(kwargs)
            for flag in ("output_attentions", "output_hidden_states"):
                if getattr(generation_config, flag):
                    model_kwargs[flag] = True
            return generation_config, model_kwargs
        return super()._prepare_generation_config(generation_config, **kwargs)

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs) -> LogitsProcessorList:
        """transformers' processors, after RAR's own two: the non-finite check on the raw logits, then guidance
        (turning the `2B` rows `[conditional; null]` into `B` guided rows, so every later processor sees one row per
        image). transformers' un-batched CFG processor is not used: `guidance_scale` means RAR's scheduled guidance."""
        model_kwargs = kwargs.get("model_kwargs") or {}
        stock_config = copy.copy(generation_config)
        stock_config.guidance_scale = None
        processors = super()._get_logits_processor(stock_config, *args, **kwargs)
        head = [RARFiniteLogitsCheck()]
        if model_kwargs.get("guidance"):
            schedule = (
                generation_config.guidance_scale,
                getattr(generation_config, "guidance_schedule", "pow-cosine"),
                getattr(generation_config, "guidance_scale_pow", 0.0),
            )
            scales = guidance_scales(self.config.image_seq_len, *schedule)
            head.append(RARClassifierFreeGuidanceLogitsProcessor(scales, prompt_length=1, schedule=schedule))
        call_processors = _CALL_PROCESSORS.get()
        if call_processors is not None:
            call_processors.extend(head)
        return LogitsProcessorList(head + list(processors))

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        position_ids=None,
        use_cache=True,
        orders=None,
        guidance=False,
        modulation_cache=None,
        step_callback: RARStepCallback | None = None,
        next_sequence_length=None,
        is_first_iteration=False,
        **kwargs,
    ):
        r"""
        The model inputs of one generation step (see [`step_inputs`]). RAR consumes `attention_mask` and
        `position_ids` (its sequences never hold padding, and positions follow from the cache), `guidance`,
        `modulation_cache`, `step_callback` (a replaced cached token crops the cache) and `next_sequence_length`; every
        other keyword (output flags, user arguments) is passed on to `forward()`, as transformers' own
        `prepare_inputs_for_generation` does.
        """
        if cache is None or not use_cache:
            fed = 0
        elif next_sequence_length is not None and not is_first_iteration:
            fed = input_ids.shape[1] - next_sequence_length
        else:  # the prefill: what an earlier call (or this one's prompt) left in the cache
            fed = cached_entries(cache)
        rewind = step_callback.pop_rewind() if step_callback is not None else None
        if rewind is not None and cache is not None and use_cache and 1 + rewind < fed:
            # The step callback replaced image tokens that are already cached: drop them from the cache (which holds
            # the cls slot and `fed` entries).
            cache.crop(1 + rewind - fed)
            fed = 1 + rewind
        if fed > 0 and fed == input_ids.shape[1]:
            # The whole sequence is cached (continuing from an earlier call): run its last entry again.
            cache.crop(-1)
            fed -= 1
        model_inputs = {key: value for key, value in kwargs.items() if key != "labels"}
        model_inputs.update(step_inputs(self, input_ids, fed, guidance, modulation_cache if cache is not None else None))
        model_inputs.update(orders=orders, cache=cache, use_cache=use_cache, logits_to_keep=1)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        # Positions come from the sequence itself (`step_inputs`): no growing position_ids / attention_mask to keep.
        model_kwargs.pop("position_ids", None)
        model_kwargs.pop("attention_mask", None)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
    ):
        # The cache also holds the cls slot (one more than the sequence) and, with guidance, the null rows. A static
        # cache is sized for this call, as transformers sizes it (`max_cache_len=` sizes it for more, e.g. to continue
        # from it later).
        batch_size = batch_size * (2 if model_kwargs.get("guidance") else 1)
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length + 1, *args, **kwargs
        )
