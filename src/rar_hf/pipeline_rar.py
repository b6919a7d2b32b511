"""RARPipeline: class-conditional image generation with a RAR generator and the MaskGIT-VQGAN tokenizer."""

import difflib
import json
import numbers
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import deprecate

from .cpu_kernels import cpu_fast_paths, disable_cpu_fast_paths, enable_cpu_fast_paths
from .generation_rar import RARStepCallback, active_guidance_processors, check_sampling_arguments, is_unconditional
from .modeling_maskgit_vqgan import MaskGITVQModel
from .modeling_rar import RARForImageGeneration

# "latent": the image tokens, as diffusers' pipelines return latents (`"tokens"` is the same, kept as an alias).
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "tokens")

# Written beside model_index.json by `save_pretrained`, so that diffusers' generic loader can find the class:
# `DiffusionPipeline.from_pretrained(folder_or_repo, custom_pipeline="pipeline_rar", trust_remote_code=True)`.
LOADER_MODULE_NAME = "pipeline_rar"
_LOADER_MODULE = '''"""Lets diffusers' generic loader open this folder:
`DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline_rar", trust_remote_code=True)`.
It only imports the installed `rar-hf` package, which the components need anyway."""

from rar_hf.pipeline_rar import RARPipeline  # noqa: F401
'''


@dataclass
class RARPipelineOutput(ImagePipelineOutput):
    """
    Output of [`RARPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the images in [0, 1]: a list of PIL
            images, an array `(batch, height, width, 3)` or a tensor `(batch, 3, height, width)`, depending on
            `output_type`; for `output_type="latent"` (or `"tokens"`), the image tokens (the same tensor as `tokens`).
        tokens (`torch.LongTensor` of shape `(batch, image_seq_len)`): the generated image tokens in raster order,
            always returned (they are what `vqvae.decode` turned into `images`).
    """

    tokens: torch.LongTensor


def _imagenet_id2label() -> dict[int, str]:
    text = resources.files("rar_hf").joinpath("imagenet_id2label.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


class RARPipeline(DiffusionPipeline):
    r"""
    Class-conditional image generation with RAR (Randomized AutoRegressive visual generation, arXiv 2411.00776).

    The generator samples the image tokens one by one in raster order (classifier-free guidance with a per-step
    scale, KV cache); the MaskGIT-VQGAN tokenizer decodes them to pixels. There is no scheduler and no latent noise:
    all randomness is in the token draws, which `generator` controls.

    Parameters:
        transformer ([`RARForImageGeneration`]): the token generator.
        vqvae ([`MaskGITVQModel`]): the tokenizer that decodes image tokens to pixels; its codebook must be the
            transformer's (checked here). Being fully convolutional, it decodes the transformer's token grid
            (`transformer.config.latent_size`) whatever grid it was trained on.
        id2label (`dict[int, str]`, *optional*): class names, comma-separated synonyms allowed (ImageNet style).
            Defaults to the 1000 ImageNet names when the generator has 1000 classes, else to `{i: str(i)}`. Saved in
            `model_index.json` (which gives the keys back as strings; both are accepted).

    Attributes:
        id2label (`dict[int, str]`): the class names.
        labels (`dict[str, list[int]]`): every lower-cased name and synonym -> its class ids (more than one id for
            the few names ImageNet reuses, e.g. `"crane"`); what [`get_label_ids`] looks names up in.

    Loading. Import `rar_hf` first: it provides the component classes that `model_index.json` names.

    ```py
    >>> from rar_hf import RARPipeline

    >>> pipe = RARPipeline.from_pretrained("path/or/hub-id")  # recommended
    ```

    `diffusers.DiffusionPipeline.from_pretrained(path)` alone fails (`module diffusers has no attribute
    RARPipeline`): diffusers looks the class up in its own namespace. `save_pretrained` therefore also writes a
    one-line `pipeline_rar.py` (it imports this class from the installed package), so the generic loader works with
    `DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline_rar", trust_remote_code=True)`.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    # Both names are the image tokens generated so far: "latents" as every diffusers pipeline calls what its loop
    # updates, "tokens" as RAR does.
    _callback_tensor_inputs = ["latents", "tokens"]

    def __init__(
        self,
        transformer: RARForImageGeneration,
        vqvae: MaskGITVQModel,
        id2label: dict[int, str] | dict[str, str] | None = None,
    ):
        super().__init__()
        vqvae_codebook = getattr(getattr(vqvae, "config", None), "codebook_size", None)
        if vqvae_codebook != transformer.config.codebook_size:
            raise ValueError(
                f"The transformer generates tokens of a codebook of {transformer.config.codebook_size} entries but the "
                f"vqvae's codebook has {vqvae_codebook}: they come from different tokenizers."
            )
        self.register_modules(transformer=transformer, vqvae=vqvae)
        num_classes = transformer.config.num_classes
        if id2label is None:
            id2label = _imagenet_id2label() if num_classes == 1000 else {i: str(i) for i in range(num_classes)}
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if set(id2label) != set(range(num_classes)):
            raise ValueError(f"id2label must name every class id 0..{num_classes - 1} exactly once.")
        self.register_to_config(id2label=id2label)
        self._interrupt = False
        self._guidance_scale = None
        self._num_timesteps = None
        self._cpu_fast_paths = "per-call"
        self.id2label = id2label
        self.labels: dict[str, list[int]] = {}
        for class_id, name in sorted(id2label.items()):
            for synonym in {name, *name.split(",")}:
                key = synonym.strip().lower()
                if key and class_id not in self.labels.setdefault(key, []):
                    self.labels[key].append(class_id)

    def get_label_ids(self, labels) -> list[int | None]:
        r"""
        Map class names and/or ids to class ids.

        Args:
            labels (`str`, `int`, `None` or a list of them): a string is one class name (any of its comma-separated
                synonyms, case-insensitive, e.g. `"white shark"`); ints are class ids and are range-checked; `None`,
                `-1`, `"none"` and `"unconditional"` are the unconditional (null) class, as everywhere in rar-hf.

        Returns:
            `list[int | None]`: one class id per label.

        Raises:
            ValueError: empty input, an id out of range, an unknown name (the error suggests close matches) or a
                name shared by several classes.

        Example:

        ```py
        >>> pipe.get_label_ids("white shark"), pipe.get_label_ids(["tench", 207])
        ([2], [0, 207])
        ```
        """
        if isinstance(labels, torch.Tensor):
            labels = labels.flatten().tolist()
        if labels is None or isinstance(labels, (str, numbers.Integral)):
            labels = [labels]
        labels = list(labels)
        if not labels:
            raise ValueError("class_labels is empty: pass at least one class id or name.")
        return [self._label_id(label) for label in labels]

    def _label_id(self, label) -> int | None:
        num_classes = self.transformer.config.num_classes
        if is_unconditional(label) and not (isinstance(label, str) and label.strip().lower() in self.labels):
            return None  # (a dataset may name a class "none": its own name wins)
        if isinstance(label, str):
            ids = self.labels.get(label.strip().lower())
            if ids is None:
                close = difflib.get_close_matches(label.strip().lower(), self.labels, n=5)
                hint = f" Did you mean one of {close}?" if close else " See `pipe.labels` for the known names."
                raise ValueError(f"Unknown class name {label!r}.{hint}")
            if len(ids) > 1:
                choices = ", ".join(f"{i} ({self.id2label[i]!r})" for i in ids)
                raise ValueError(f"Class name {label!r} is ambiguous: it names classes {choices}. Pass the id instead.")
            return ids[0]
        if isinstance(label, numbers.Integral) and not isinstance(label, bool):
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"Class id {label} is out of range: this model has classes 0..{num_classes - 1} (and None, -1, "
                    "'none' or 'unconditional' for the unconditional class)."
                )
            return int(label)
        raise TypeError(f"A class label must be a name (str), an id (int) or None (unconditional), got {label!r}.")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        Path(save_directory, f"{LOADER_MODULE_NAME}.py").write_text(_LOADER_MODULE, encoding="utf-8")
        # rar_hf.model_card writes our model card and pushes: diffusers' push would replace the card by a generic one.
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "create_pr", "commit_message") if k in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        from .model_card import finish_saved_pipeline

        finish_saved_pipeline(self, save_directory, push_to_hub=push_to_hub, **hub_kwargs)

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` inside `callback_on_step_end` to stop generating after that token."""
        return self._interrupt

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the running (or last) call. A `callback_on_step_end` that sets
        `pipe._guidance_scale` changes the guidance of the tokens after it (same schedule)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale is not None and self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int | None:
        """Tokens the running (or last) call generates: RAR's steps."""
        return self._num_timesteps

    def enable_cpu_fast_paths(self):
        """Keep the transformer on the CPU fast paths (packed linear layers, the CPU decoding attention; see
        `rar_hf.cpu_kernels`) across calls, instead of applying them for the duration of each call on a CPU (the
        default, which leaves `pipe.transformer` unchanged between calls at the cost of packing once per call, about a
        second for RAR-B). While enabled the transformer cannot be moved or cast: call `disable_cpu_fast_paths()`."""
        enable_cpu_fast_paths(self.transformer)
        self._cpu_fast_paths = "enabled"

    def disable_cpu_fast_paths(self):
        """Plain `nn.Linear` layers and sdpa again (bit-exact weights), and no fast paths in later calls."""
        disable_cpu_fast_paths(self.transformer)
        self._cpu_fast_paths = "disabled"

    @torch.no_grad()
    def decode_partial(self, tokens: torch.LongTensor, output_type: str = "pil"):
        r"""
        Decode partially generated images: the positions not generated yet are shown mid-gray.

        Args:
            tokens (`torch.LongTensor` of shape `(batch, n)`): image tokens in raster order, `n <= image_seq_len`
                (the first `n` positions of the grid), or `(batch, image_seq_len)` with `-1` at the positions not
                generated (what an interrupted call in another order returns).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`, as in [`__call__`].

        Returns:
            The images in the requested type (as `RARPipelineOutput.images`); fully generated tokens decode exactly
            as [`__call__`] decodes them.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be one of ('pil', 'np', 'pt'), got {output_type!r}.")
        config = self.transformer.config
        length = config.image_seq_len
        if tokens.dim() != 2 or tokens.shape[1] > length:
            raise ValueError(f"tokens must have shape (batch, n) with n <= {length}, got {tuple(tokens.shape)}.")
        device = self.vqvae.device
        tokens = tokens.to(device)
        grid = torch.full((tokens.shape[0], length), -1, dtype=torch.long, device=device)
        grid[:, : tokens.shape[1]] = tokens
        known = grid >= 0
        # Any valid token decodes the unknown cells; they are painted over below.
        images = self.vqvae.decode(grid.clamp(min=0), latent_size=tuple(config.latent_size)).sample
        if not known.all():
            mask = known.view(-1, 1, *config.latent_size).to(images.dtype)
            mask = torch.nn.functional.interpolate(mask, size=images.shape[-2:], mode="nearest")
            images = images * mask + 0.5 * (1 - mask)
        return self._to_output_type(images, output_type)

    def _to_output_type(self, images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images
        # float32 for numpy/PIL whatever the compute dtype (bfloat16 has no numpy equivalent).
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    def _step_callback(self, progress_bar, callback_on_step_end, tensor_inputs):
        """What runs after every kept token: the progress bar, then `callback_on_step_end` (its returned `latents` or
        `tokens` replace the tokens so far; a changed `pipe._guidance_scale` re-scales the rest of the schedule)."""
        done = []

        def on_token(index: int, tokens: torch.LongTensor):
            progress_bar.update()
            done.append(index)
            if callback_on_step_end is None:
                return None
            guidance_scale = self._guidance_scale
            callback_kwargs = {name: tokens.clone() for name in tensor_inputs}
            outputs = callback_on_step_end(self, len(done) - 1, index, callback_kwargs) or {}
            if self._guidance_scale != guidance_scale:
                for processor in active_guidance_processors():
                    processor.set_guidance_scale(self._guidance_scale, from_step=index + 1)
            # A returned tensor that differs from the tokens (replaced, or edited in place) is continued from.
            changed = [outputs[name] for name in ("latents", "tokens") if name in outputs]
            changed = [value for value in changed if value is not None and not torch.equal(value, tokens)]
            if len(changed) == 2 and not torch.equal(changed[0], changed[1]):
                raise ValueError("callback_on_step_end changed `latents` and `tokens` differently: change one of them.")
            return changed[0] if changed else None

        return on_token

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        guidance_scale_pow: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_cache: bool = True,
        cache_implementation: str | None = None,
        orders=None,
        assistant_model: RARForImageGeneration | None = None,
        jacobi_window: int | None = None,
        num_assistant_tokens: int | None = None,
        acceptance: str | None = None,
        relax: float | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents", "tokens"],
        **kwargs,
    ) -> RARPipelineOutput | tuple:
        r"""
        Generate images of the given classes.

        Args:
            class_labels (`int`, `str`, `None` or a list of them): class ids, class names (see [`get_label_ids`]) or
                `None` / `-1` / `"none"` / `"unconditional"` for unconditional samples.
            num_images_per_prompt (`int`, defaults to 1): images per label; the batch holds them label by label
                (`[a, a, b, b]`), so they tile as one grid row per label. (`num_images_per_label` is a deprecated
                alias.)
            guidance_scale (`float`, *optional*): classifier-free guidance scale. `1.0` disables guidance (and halves
                the compute).
            guidance_schedule (`str`, *optional*): how the scale grows over the tokens: `"pow-cosine"` (official),
                `"linear"` or `"constant"`.
            guidance_scale_pow (`float`, *optional*): exponent of the pow-cosine schedule.
            temperature (`float`, *optional*): sampling temperature. These four default to
                `transformer.generation_config` (the paper's values for converted official models).
            top_k (`int`, *optional*): sample only among the `top_k` most likely tokens (not used by the paper).
            top_p (`float`, *optional*): nucleus sampling threshold (not used by the paper).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling deterministic: it
                drives every random draw (tokens, and random orders), exactly as in
                [`RARForImageGeneration.generate`], which the pipeline calls. With a list (one generator per image),
                each image depends only on its own generator and label, whatever else is in the batch (up to
                floating-point differences between batch sizes, which can flip a near-tie). `None` uses torch's
                global RNG.
            output_type (`str`, defaults to `"pil"`): `"pil"` (list of `PIL.Image`), `"np"` (`(B, H, W, 3)` array),
                `"pt"` (`(B, 3, H, W)` tensor) or `"latent"` (no decoding: `images` are the `(B, image_seq_len)` image
                tokens, raster order; `"tokens"` is an alias).
            return_dict (`bool`, defaults to `True`): return a [`RARPipelineOutput`] instead of a tuple.
            use_cache (`bool`, defaults to `True`): decode with a KV cache (the output is the same either way).
            cache_implementation (`str`, *optional*): transformers cache type, e.g. `"static"` (for torch.compile).
            orders (*optional*): generation order: `None`/`"raster"` (how RAR is used), `"random"` (one permutation
                per image, drawn from `generator`), a scan-order name or a `(B, image_seq_len)` tensor. Orders other
                than raster need a model whose target-aware position embedding is not folded.
            callback_on_step_end (`Callable`, [`~diffusers.callbacks.PipelineCallback`] or
                [`~diffusers.callbacks.MultiPipelineCallbacks`], *optional*): called once per generated token as
                `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`. `step` counts the tokens this
                call generated (0-based, so the last is `pipe.num_timesteps - 1`); `timestep` is the index of the token
                just generated among the image tokens, in generation order (RAR has no scheduler);
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs`. Entries of the
                returned dict replace those tensors, and generation continues from the replacement. Set
                `pipe._interrupt = True` in the callback to stop after the current token (see Returns).
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to both): the tensors passed in
                `callback_kwargs`, among `pipe._callback_tensor_inputs`: `"latents"` and `"tokens"` are both the
                `(batch, n)` `LongTensor` of the image tokens so far, in generation order (raster order unless `orders`
                says otherwise; see [`decode_partial`] to look at them).
            assistant_model ([`RARForImageGeneration`], *optional*): a smaller RAR with the same tokenizer and classes
                that drafts `num_assistant_tokens` tokens for the transformer to verify several at a time (exact
                speculative sampling).
            jacobi_window (`int`, *optional*): speculative Jacobi decoding (training-free, exact) with this many
                guessed tokens per pass. With either, the samples follow the same distribution as without, but not
                the same draws for a given `generator`; callbacks and the progress bar see every kept token.
            acceptance (`str`, *optional*): `"lossless"` (default, exact) or `"relaxed"` (faster, NOT exact: accepts
                drafts `relax` times more readily, default 2), for `assistant_model` and `jacobi_window`.

        On a CPU the transformer runs on packed linear layers and the CPU decoding attention for the duration of the
        call (see [`enable_cpu_fast_paths`]); it is left unchanged afterwards.

        Returns:
            [`RARPipelineOutput`] with `images` and `tokens`, or the tuple `(images, tokens)` if `return_dict` is
            `False`. After an interrupt at step `n - 1`, `tokens` is `(batch, n)`, the tokens generated so far in
            raster order (in another generation order: `(batch, image_seq_len)` with `-1` at the positions not
            generated), and the images are [`decode_partial`] of them: the positions not generated are mid-gray.

        Examples:

        ```py
        >>> import torch
        >>> from rar_hf import RARPipeline

        >>> pipe = RARPipeline.from_pretrained("path/or/hub-id").to("cuda")
        >>> generator = torch.Generator("cuda").manual_seed(0)
        >>> images = pipe(["golden retriever", 88], num_images_per_prompt=4, generator=generator).images
        ```

        A live preview of the partially generated images every 32 tokens, and a stop button:

        ```py
        >>> def preview(pipe, step, timestep, callback_kwargs):
        ...     if (step + 1) % 32 == 0:
        ...         show(pipe.decode_partial(callback_kwargs["tokens"]))  # a list of PIL images, gray where not yet drawn
        ...     if stop_requested():
        ...         pipe._interrupt = True  # the call returns the partial images
        ...     return {}

        >>> images = pipe(["golden retriever"], callback_on_step_end=preview).images
        ```
        """
        num_images_per_label = deprecate(
            "num_images_per_label", "1.0.0", "Use `num_images_per_prompt`, diffusers' name.", take_from=kwargs
        )
        if num_images_per_label is not None:
            if num_images_per_prompt != 1:
                raise ValueError("Pass num_images_per_prompt only (num_images_per_label is its deprecated alias).")
            num_images_per_prompt = num_images_per_label

        # 1. Check the inputs before any compute.
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if type(num_images_per_prompt) is not int or num_images_per_prompt < 1:  # `is`: bools are ints too
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable, got {callback_on_step_end!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found {unknown}."
            )
        label_ids = [i for i in self.get_label_ids(class_labels) for _ in range(num_images_per_prompt)]
        batch_size = len(label_ids)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for {batch_size} images (labels x num_images_per_prompt): pass one "
                "generator per image, or a single generator."
            )
        check_sampling_arguments(
            guidance_scale, guidance_schedule, guidance_scale_pow, temperature, top_k, top_p, generator, batch_size
        )
        device = self._execution_device
        transformer = self.transformer
        config = transformer.config
        self._guidance_scale = transformer.generation_config.guidance_scale if guidance_scale is None else guidance_scale
        self._num_timesteps = config.image_seq_len
        self._interrupt = False
        speculative = dict(
            assistant_model=assistant_model, jacobi_window=jacobi_window, num_assistant_tokens=num_assistant_tokens,
            acceptance=acceptance, relax=relax,
        )  # fmt: skip

        # 2. Sample the image tokens with the model's generate() (guidance, cache, seeded draws, random orders); the
        # step callback advances the progress bar and runs callback_on_step_end after every kept token.
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            step_callback = RARStepCallback(
                self._step_callback(progress_bar, callback_on_step_end, callback_on_step_end_tensor_inputs),
                config.codebook_size,
                should_stop=lambda: self._interrupt,
            )
            fast_paths = self._cpu_fast_paths == "per-call" and device.type == "cpu"
            with cpu_fast_paths(transformer, num_rows=2 * batch_size, enabled=fast_paths):
                sequences = transformer.generate(
                    input_ids=transformer.prepare_class_ids(label_ids, device=device),
                    guidance_scale=self._guidance_scale,
                    guidance_schedule=guidance_schedule,
                    guidance_scale_pow=guidance_scale_pow,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator,
                    orders=orders,
                    step_callback=step_callback,
                    do_sample=True,
                    use_cache=use_cache,
                    cache_implementation=cache_implementation,
                    **{name: value for name, value in speculative.items() if value is not None},
                )
        tokens = sequences[:, 1:]  # drop the class token; generate returns raster order whatever the order used
        complete = tokens.shape[1] == config.image_seq_len and bool((tokens >= 0).all())

        # 3. Decode the tokens to pixels in [0, 1].
        if output_type in ("latent", "tokens"):
            images = tokens
        elif complete:
            images = self._to_output_type(self.vqvae.decode(tokens, latent_size=tuple(config.latent_size)).sample, output_type)
        else:
            images = self.decode_partial(tokens, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return images, tokens
        return RARPipelineOutput(images=images, tokens=tokens)
