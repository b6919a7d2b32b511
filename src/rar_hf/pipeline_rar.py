"""RARPipeline: class-conditional image generation with a RAR generator and the MaskGIT-VQGAN tokenizer."""

import difflib
import json
import numbers
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import deprecate
from transformers import LogitsProcessor, LogitsProcessorList

from .cpu_kernels import cpu_fast_paths, disable_cpu_fast_paths, enable_cpu_fast_paths
from .generation_rar import (
    RARStepCallback,
    active_guidance_processors,
    check_sampling_arguments,
    is_unconditional,
    uniform_draws,
)
from .modeling_maskgit_vqgan import MaskGITVQModel
from .modeling_rar import RARForImageGeneration

# Below this many transformer parameters, the CPU fast paths cost more than they save (see _worth_cpu_fast_paths).
CPU_FAST_PATHS_MIN_PARAMETERS = 5_000_000
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


class KeptTokensLogitsProcessor(LogitsProcessor):
    r"""
    Makes row `r` emit `tokens[r, s]` at every step `s < counts[r]`: the kept tokens of an inpainting batch whose rows
    keep different numbers of tokens.

    [`RARPipeline`] reads the kept tokens that every row has as one prefix (one forward pass); the rows that keep more
    emit the rest of theirs through this processor, one decoding step each, while the other rows already sample. The
    scores of a forced row are `-inf` except at its kept token, so greedy decoding, seeded sampling (the draw is an
    argmax over the scores plus noise), top-k/p and speculative acceptance all emit exactly that token.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, n)`): each row's tokens in generation order (the first
            `counts[r]` are read).
        counts (`torch.LongTensor` of shape `(batch,)`): kept tokens per row.
        prompt_length (`int`, defaults to 1): entries of `input_ids` before the first image token (the class token).
    """

    def __init__(self, tokens: torch.LongTensor, counts: torch.LongTensor, prompt_length: int = 1):
        self.tokens = tokens
        self.counts = counts.to(tokens.device)
        self.last_forced_step = int(counts.max()) - 1  # a Python int: no host synchronisation per step
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length  # the index of the token being chosen, in generation order
        if step > self.last_forced_step:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        forced.scatter_(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)
        return torch.where((self.counts > step)[:, None].to(scores.device), forced, scores)


@dataclass
class InpaintingPlan:
    r"""
    What an inpainting call keeps and in which order it generates the rest (built by
    [`RARPipeline.prepare_inpainting`]).

    Args:
        keep (`torch.BoolTensor` of shape `(batch, image_seq_len)`): raster positions whose token is kept.
        codes (`torch.LongTensor` of shape `(batch, image_seq_len)`): the VQ codes of each row's image, raster order.
        orders (`torch.LongTensor` of shape `(batch, image_seq_len)`): the generation order of each row: its kept
            positions first, then the regenerated ones (each group in the order of the call's `orders`, raster by
            default).
        raster (`bool`): whether `orders` is raster order for every row (then `generate()` gets `orders=None`, which
            a model with a folded target-aware position embedding needs).
    """

    keep: torch.BoolTensor
    codes: torch.LongTensor
    orders: torch.LongTensor
    raster: bool

    @property
    def counts(self) -> torch.LongTensor:
        """Kept tokens per row."""
        return self.keep.sum(dim=1)

    @property
    def common(self) -> int:
        """Kept tokens every row has: the prefix read in one forward pass."""
        return int(self.counts.min())

    @property
    def grid(self) -> torch.LongTensor:
        """`(batch, image_seq_len)` raster grid of the kept codes, `-1` where a token is regenerated."""
        return torch.where(self.keep, self.codes, -1)

    def tokens_in_order(self) -> torch.LongTensor:
        """The codes in generation order (the kept ones are the first `counts[r]` of row `r`)."""
        return self.codes.gather(1, self.orders)

    def to_grid(self, tokens: torch.LongTensor) -> torch.LongTensor:
        """Tokens `(batch, n)` in generation order -> the raster grid: the kept codes, the `n` tokens so far, `-1` at
        the positions not generated yet."""
        grid = self.grid.to(tokens.device)
        return grid.scatter(1, self.orders[:, : tokens.shape[1]].to(tokens.device), tokens)

    def from_grid(self, grid: torch.LongTensor, tokens: torch.LongTensor) -> torch.LongTensor:
        """A raster grid returned by a step callback -> the `(batch, n)` tokens so far in generation order; only the
        positions generated so far may differ from [`to_grid`]`(tokens)`."""
        before = self.to_grid(tokens)
        if not isinstance(grid, torch.Tensor) or tuple(grid.shape) != tuple(before.shape):
            shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
            raise ValueError(
                f"callback_on_step_end returned tokens of shape {shape}; when inpainting they are the raster grid "
                f"{tuple(before.shape)} (batch, image_seq_len), with -1 where nothing is generated yet."
            )
        grid = grid.to(before.device)
        ahead = self.orders[:, tokens.shape[1] :].to(before.device)
        if not torch.equal(grid.gather(1, ahead), before.gather(1, ahead)):
            raise ValueError(
                "callback_on_step_end changed positions that are not generated yet: it may replace the tokens generated "
                "so far (kept ones included), not the ones to come."
            )
        return grid.gather(1, self.orders[:, : tokens.shape[1]].to(before.device))


def _image_count_index(count: int, name: str, num_prompts: int, num_images_per_prompt: int) -> torch.LongTensor:
    """Which of `count` images (or masks) each of the `num_prompts * num_images_per_prompt` rows uses."""
    batch_size = num_prompts * num_images_per_prompt
    if count == 1:
        return torch.zeros(batch_size, dtype=torch.long)
    if count == batch_size:
        return torch.arange(batch_size)
    if count == num_prompts:
        return torch.arange(num_prompts).repeat_interleave(num_images_per_prompt)
    raise ValueError(
        f"Got {count} {name}s for {num_prompts} class label(s) x {num_images_per_prompt} image(s) per prompt: pass "
        f"one {name}, one per class label ({num_prompts}) or one per generated image ({batch_size})."
    )


def _checked_images(value, name: str, allow_bool: bool = False):
    """`value` as VaeImageProcessor takes it, after one clear check of what it is (arrays and tensors as floats)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    kinds = (PIL.Image.Image, np.ndarray, torch.Tensor)
    if not items or not all(isinstance(item, kinds) for item in items) or len({type(item) for item in items}) > 1:
        raise TypeError(
            f"{name} must be a PIL image, a numpy array or a torch tensor, or a list of one of these (what diffusers' "
            f"VaeImageProcessor accepts); got {_describe(value)}. Load a file with diffusers.utils.load_image(path)."
        )
    checked = []
    for item in items:
        if isinstance(item, (np.ndarray, torch.Tensor)):
            is_bool = item.dtype in (np.bool_, torch.bool)
            is_float = item.dtype.kind == "f" if isinstance(item, np.ndarray) else item.is_floating_point()
            if is_bool and allow_bool:
                item = item.astype(np.float32) if isinstance(item, np.ndarray) else item.float()
            elif not is_float:
                raise ValueError(
                    f"{name} arrays and tensors hold floats in [0, 1] (as in diffusers' pipelines), got dtype "
                    f"{item.dtype}{'; or pass a boolean mask' if allow_bool else ''} (e.g. divide uint8 pixels by 255)."
                )
            if isinstance(item, torch.Tensor):
                item = item.detach().cpu().float()
        checked.append(item)
    # A single array or tensor goes as it is: VaeImageProcessor reads a 3-d one by its own rules (a batch of masks).
    return checked if isinstance(value, (list, tuple)) else checked[0]


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {sorted({type(item).__name__ for item in value}) or 'nothing'}"
    return f"{type(value).__name__} {value!r}"[:120]


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
        # Inpainting inputs are prepared as diffusers' inpainting pipelines prepare theirs: images resized to the model's
        # size, in [0, 1] (the tokenizer's range, so no normalisation); masks resized, one channel, binarized at 0.5.
        # The tokenizer takes pixels, never latents: no tensor is taken for latents, whatever its channels.
        scale_factor = getattr(vqvae, "downsample_factor", 1)
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=scale_factor, vae_latent_channels=None, do_normalize=False, do_convert_rgb=True
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale_factor, vae_latent_channels=None, do_normalize=False, do_binarize=True,
            do_convert_grayscale=True,
        )  # fmt: skip
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
        self._cpu_fast_paths = "auto"
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

    def _worth_cpu_fast_paths(self) -> bool:
        # Packed products win once reading the weights dominates a step: measured on 2 cores (benchmarks/README.md,
        # "When the CPU fast paths pay off"), the shipped 1.3M-parameter digits model steps at 0.59-0.73x on them,
        # 10M parameters at 1.04-1.13x, RAR-B (258M) at 1.90-2.26x.
        return self.transformer.num_parameters() >= CPU_FAST_PATHS_MIN_PARAMETERS

    def enable_cpu_fast_paths(self):
        """Keep the transformer on the CPU fast paths (packed linear layers, the CPU decoding attention; see
        `rar_hf.cpu_kernels`) across calls. By default a call on a CPU applies them for its own duration when the
        transformer has at least `CPU_FAST_PATHS_MIN_PARAMETERS` parameters (below that they are slower), which leaves
        `pipe.transformer` unchanged between calls at the cost of packing once per call (about a second for RAR-B).
        While enabled the transformer can still be moved or cast (its packed layers then run `F.linear`), but call
        `disable_cpu_fast_paths()` to get plain `nn.Linear` layers back."""
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

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of the images the pipeline makes and takes (`image=` and `mask_image=` are resized to it):
        the transformer's token grid times the tokenizer's downsampling factor."""
        height, width = self.transformer.config.latent_size
        return height * self.vqvae.downsample_factor, width * self.vqvae.downsample_factor

    def prepare_mask(self, mask_image: PipelineImageInput) -> tuple[torch.Tensor, torch.BoolTensor]:
        r"""
        The inpainting mask as [`__call__`] reads it: resized to [`image_size`] (whatever its size), one channel,
        binarized at 0.5 (diffusers' mask processor), then pooled to the token grid: a token is **regenerated when
        any pixel of its patch is white** (>= 0.5), kept when all of them are black.

        Args:
            mask_image: PIL image(s) (converted to grayscale), or float/boolean arrays or tensors in [0, 1] of shape
                `(H, W)`, `(B, H, W)`, `(B, H, W, 1)` (numpy) or `(B, 1, H, W)` (torch); white (1, `True`) =
                regenerate, black (0) = keep.

        Returns:
            `(pixels, keep)`: the binarized masks `(B, 1, height, width)` and `keep` `(B, image_seq_len)`, `True` where
            the token is kept (raster order).
        """
        masks = _checked_images(mask_image, "mask_image", allow_bool=True)
        for mask in masks if isinstance(masks, list) else [masks]:
            if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[-1] in (3, 4):
                raise ValueError(
                    f"mask_image has {mask.shape[-1]} channels (shape {mask.shape}); a mask has one: pass a (H, W) or "
                    "(B, H, W) array, or a PIL image (converted to grayscale)."
                )
        pixels = self.mask_processor.preprocess(masks, *self.image_size)
        if pixels.dim() != 4 or pixels.shape[1] != 1:
            raise ValueError(
                f"mask_image must have one channel (white = regenerate): got masks of shape {tuple(pixels.shape)} "
                "after preparation; pass (H, W), (B, H, W) or (B, 1, H, W) tensors, or PIL images."
            )
        factor = self.vqvae.downsample_factor
        regenerate = F.max_pool2d(pixels.float(), kernel_size=factor, stride=factor) > 0.5
        return pixels, ~regenerate.flatten(1)

    def prepare_image(self, image: PipelineImageInput) -> torch.Tensor:
        r"""
        The images of an inpainting call as the tokenizer takes them: `(B, 3, height, width)` in [0, 1], resized to
        [`image_size`] with diffusers' `VaeImageProcessor` (PIL images are converted to RGB; arrays and tensors hold
        floats in [0, 1]; one channel is repeated to three).
        """
        images = _checked_images(image, "image")
        pixels = self.image_processor.preprocess(images, *self.image_size)
        if pixels.dim() == 4 and pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"image must have 3 (RGB) or 1 (grey) channels: got shape {tuple(pixels.shape)} after preparation; "
                "pass (H, W, C) / (B, H, W, C) arrays or (C, H, W) / (B, C, H, W) tensors."
            )
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 1:
            raise ValueError(f"image values must lie in [0, 1] (as in diffusers' pipelines), got [{low:.4g}, {high:.4g}].")
        return pixels

    def prepare_inpainting(
        self, image, mask_image, num_prompts: int, num_images_per_prompt: int = 1, orders=None, generator=None
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.BoolTensor, torch.LongTensor | None]:
        r"""
        Everything an inpainting call checks and prepares before any model runs: the images, the masks, which image
        and mask each generated image uses, and the generation orders.

        Returns:
            `(pixels, image_index, keep, orders)`: the prepared images `(N, 3, height, width)`, the image of each of the
            `num_prompts * num_images_per_prompt` rows, the kept tokens `(batch, image_seq_len)` and the call's
            resolved generation orders (`None`: raster).
        """
        if image is None or mask_image is None:
            missing = "mask_image" if mask_image is None else "image"
            raise ValueError(
                f"Inpainting takes image= and mask_image= together ({missing} is missing): mask_image is white (1) where "
                "to regenerate and black (0) where to keep image."
            )
        pixels = self.prepare_image(image)
        _, keep = self.prepare_mask(mask_image)
        image_index = _image_count_index(pixels.shape[0], "image", num_prompts, num_images_per_prompt)
        keep = keep[_image_count_index(keep.shape[0], "mask", num_prompts, num_images_per_prompt)]
        transformer = self.transformer
        batch_size = keep.shape[0]
        device = self._execution_device
        if transformer.model.target_aware_position_embedding is None:
            positions = torch.arange(keep.shape[1])
            is_prefix = torch.equal(keep, positions[None] < keep.sum(dim=1, keepdim=True))
            raster_orders = orders is None or (isinstance(orders, str) and orders == "raster")
            if not is_prefix or not raster_orders:
                raise ValueError(
                    "This model's target-aware position embedding was folded into its position embedding for raster "
                    "order, so it can only continue a raster prefix: the mask may only keep the top rows (and the "
                    "start of the row after them) and generation runs in raster order (orders=None). "
                    + ("This mask keeps a token after a regenerated one." if not is_prefix else f"Got orders={orders!r}.")
                )
        resolved = transformer._resolve_orders(orders, batch_size, device, generator)
        if resolved is not None:
            class_ids = torch.full((batch_size, 1), transformer.config.null_class_id, device=device)
            transformer.check_inputs(class_ids, resolved)  # shape and permutations, before any compute
        return pixels, image_index, keep, resolved

    def _inpainting_plan(self, pixels, image_index, keep, orders) -> InpaintingPlan:
        """Encode the images (the kept tokens are their VQ codes) and order each row's kept positions first."""
        device = self._execution_device
        pixels = pixels.to(device=self.vqvae.device, dtype=self.vqvae.dtype)
        codes = self.vqvae.encode(pixels).indices.to(device)[image_index.to(device)]
        keep = keep.to(device)
        length = keep.shape[1]
        base = orders if orders is not None else torch.arange(length, device=device).expand(keep.shape[0], -1)
        # A stable partition of each row's order: its kept positions first, then the regenerated ones.
        regenerated_first = (~keep.gather(1, base)).to(torch.uint8)
        plan_orders = base.gather(1, torch.sort(regenerated_first, dim=1, stable=True).indices)
        raster = bool((plan_orders == torch.arange(length, device=device)).all())
        return InpaintingPlan(keep=keep, codes=codes, orders=plan_orders, raster=raster)

    def _step_callback(self, progress_bar, callback_on_step_end, tensor_inputs, plan: InpaintingPlan | None = None):
        """What runs after every kept token: the progress bar, then `callback_on_step_end` (its returned `latents` or
        `tokens` replace the tokens so far; a changed `pipe._guidance_scale` re-scales the rest of the schedule).
        When inpainting (`plan`), the callback sees and returns the raster grid of the whole image."""
        done = []

        def on_token(index: int, tokens: torch.LongTensor):
            progress_bar.update()
            done.append(index)
            if callback_on_step_end is None:
                return None
            guidance_scale = self._guidance_scale
            shown = tokens if plan is None else plan.to_grid(tokens)
            callback_kwargs = {name: shown.clone() for name in tensor_inputs}
            outputs = callback_on_step_end(self, len(done) - 1, index, callback_kwargs) or {}
            if self._guidance_scale != guidance_scale:
                for processor in active_guidance_processors():
                    processor.set_guidance_scale(self._guidance_scale, from_step=index + 1)
            # A returned tensor that differs from the tokens (replaced, or edited in place) is continued from.
            changed = [outputs[name] for name in ("latents", "tokens") if name in outputs]
            changed = [value for value in changed if value is not None and not torch.equal(value, shown)]
            if len(changed) == 2 and not torch.equal(changed[0], changed[1]):
                raise ValueError("callback_on_step_end changed `latents` and `tokens` differently: change one of them.")
            if not changed:
                return None
            return changed[0] if plan is None else plan.from_grid(changed[0], tokens)

        return on_token

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
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
        Generate images of the given classes, or complete (inpaint) given images.

        Args:
            class_labels (`int`, `str`, `None` or a list of them): class ids, class names (see [`get_label_ids`]) or
                `None` / `-1` / `"none"` / `"unconditional"` for unconditional samples.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*): images to complete
                (inpainting, with `mask_image`): anything diffusers' `VaeImageProcessor` takes (arrays and tensors hold
                floats in [0, 1]), resized to the model's size ([`image_size`]). One image for the whole batch, one per
                class label, or one per generated image (labels x `num_images_per_prompt`).
            mask_image (same types as `image`, *optional*): white (1) where to regenerate, black (0) where to keep,
                as in diffusers' inpainting pipelines: resized to the model's size whatever its own size, converted to
                one channel and binarized at 0.5. A token is regenerated when **any** pixel of its patch is white (see
                [`prepare_mask`]); the kept tokens are exactly the VQ codes of `image` (`vqvae.encode`). They come
                first in the generation order and are read in one forward pass; the regenerated tokens follow, in
                raster order among themselves, or in the order of `orders` among themselves. A mask that keeps
                everything returns the image's own codes (nothing is generated); one that keeps nothing is plain
                generation. Counts as for `image`; rows may keep different tokens (see Inpainting below).
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

        On a CPU a transformer of at least `CPU_FAST_PATHS_MIN_PARAMETERS` parameters runs on packed linear layers and
        the CPU decoding attention for the duration of the call (see [`enable_cpu_fast_paths`]); it is left unchanged
        afterwards.

        Inpainting (`image=` and `mask_image=`). The tokens every row keeps are read as one prefix; a row that keeps
        more emits its remaining kept tokens one decoding step each, forced by a [`KeptTokensLogitsProcessor`] (its
        scores are `-inf` except at the kept token), while the other rows sample: exact for any mix of masks, at the
        cost of one step per extra kept token. `pipe.num_timesteps` is the number of steps the call runs
        (`image_seq_len` minus the tokens every row keeps). With a `generator` (and without speculative decoding,
        which draws differently), the token drawn at each step is the one a full generation with that generator
        draws at that step (the draws a full generation makes for the kept steps are drawn and discarded), so a row
        depends only on its own generator (with a list), image and mask, whatever else is in the batch (up to
        floating-point differences between batch layouts). The returned images are decoded from the tokens, so the
        kept region is the tokenizer's reconstruction of `image` rather than its pixels (as diffusers' inpainting
        pipelines return the VAE's decode; paste the original back with
        `pipe.image_processor.apply_overlay(mask, image, result)` if you need it). `callback_on_step_end` then
        sees (and may return) the whole raster grid `(batch, image_seq_len)`: the kept tokens from the start, `-1`
        where nothing is generated yet, which [`decode_partial`] shows. A model whose target-aware position embedding
        is folded (`config.target_aware_position_embedding_folded`) runs raster order only, so its masks may only keep
        a raster prefix (the top rows).

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

        Inpainting: regenerate the white part of the mask, keep the rest of the image:

        ```py
        >>> from diffusers.utils import load_image

        >>> image, mask = load_image("dog.png"), load_image("mask.png")  # mask: white = regenerate
        >>> images = pipe("golden retriever", image=image, mask_image=mask, num_images_per_prompt=3).images
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
        speculative = dict(
            assistant_model=assistant_model, jacobi_window=jacobi_window, num_assistant_tokens=num_assistant_tokens,
            acceptance=acceptance, relax=relax,
        )  # fmt: skip
        speculative = {name: value for name, value in speculative.items() if value is not None}
        inpainting = None
        if image is not None or mask_image is not None:
            num_prompts = batch_size // num_images_per_prompt
            inpainting = self.prepare_inpainting(image, mask_image, num_prompts, num_images_per_prompt, orders, generator)
        self._guidance_scale = transformer.generation_config.guidance_scale if guidance_scale is None else guidance_scale
        self._interrupt = False

        # 2. Inpainting: the kept tokens are the images' VQ codes, first in the generation order.
        input_ids = transformer.prepare_class_ids(label_ids, device=device)
        plan, kept_tokens_processor = None, None
        if inpainting is not None:
            plan = self._inpainting_plan(*inpainting)
            orders = None if plan.raster else plan.orders
            common = plan.common
            input_ids = torch.cat([input_ids, plan.tokens_in_order()[:, :common]], dim=1)
            if bool((plan.counts > common).any()):
                kept_tokens_processor = KeptTokensLogitsProcessor(plan.tokens_in_order(), plan.counts)
            if generator is not None and not speculative:
                # The draws of the steps a full generation would have sampled before `common`: each later token is
                # drawn as that generation draws it (the sampler draws one (batch, vocabulary) uniform per step).
                for _ in range(common):
                    uniform_draws((batch_size, config.codebook_size), generator, device)
        self._num_timesteps = config.image_seq_len - (input_ids.shape[1] - 1)

        # 3. Sample the image tokens with the model's generate() (guidance, cache, seeded draws, random orders); the
        # step callback advances the progress bar and runs callback_on_step_end after every kept token.
        if self._num_timesteps == 0:  # the masks keep every token: nothing to generate
            sequences = torch.cat([input_ids[:, :1], plan.codes], dim=1)
        else:
            with self.progress_bar(total=self._num_timesteps) as progress_bar:
                step_callback = RARStepCallback(
                    self._step_callback(progress_bar, callback_on_step_end, callback_on_step_end_tensor_inputs, plan),
                    config.codebook_size,
                    should_stop=lambda: self._interrupt,
                )
                fast_paths = self._cpu_fast_paths == "auto" and device.type == "cpu" and self._worth_cpu_fast_paths()
                with cpu_fast_paths(transformer, num_rows=2 * batch_size, enabled=fast_paths):
                    sequences = transformer.generate(
                        input_ids=input_ids,
                        guidance_scale=self._guidance_scale,
                        guidance_schedule=guidance_schedule,
                        guidance_scale_pow=guidance_scale_pow,
                        temperature=temperature,
                        top_k=top_k,
                        top_p=top_p,
                        generator=generator,
                        orders=orders,
                        step_callback=step_callback,
                        logits_processor=LogitsProcessorList([kept_tokens_processor] if kept_tokens_processor is not None else []),
                        do_sample=True,
                        use_cache=use_cache,
                        # None: the transformer's generation_config decides (a static cache for converted models)
                        **({"cache_implementation": cache_implementation} if cache_implementation else {}),
                        **speculative,
                    )
        tokens = sequences[:, 1:]  # drop the class token; generate returns raster order whatever the order used
        if plan is not None:  # the whole grid: kept codes, generated tokens, -1 where an interrupt left a hole
            grid = torch.full_like(plan.codes, -1)
            grid[:, : tokens.shape[1]] = tokens
            tokens = torch.where(grid >= 0, grid, plan.grid)
        complete = tokens.shape[1] == config.image_seq_len and bool((tokens >= 0).all())

        # 4. Decode the tokens to pixels in [0, 1].
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
