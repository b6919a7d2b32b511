"""MaskGIT-VQGAN image tokenizer (the pixel tokenizer used by RAR and MaskGIT) as a diffusers model.

Parameter names equal the keys of the official state dict (bytedance/1d-tokenizer, itself a port of
huggingface/open-muse `modeling_maskgit_vqgan.py`), so an official checkpoint loads strictly (with
`rar_hf.convert.maskgit_vqgan_from_official_checkpoint`, which infers the config from its shapes), and every
quirk of the official network is kept: bias-free residual convolutions, a 1x1 shortcut applied to the
block output instead of its input, 2x2 average-pool downsampling, images in [0, 1] used without
normalisation, and a decoder output clamped to [0, 1].
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

# Images may overshoot [0, 1] by this much (resizing/rounding noise) before they are rejected.
_PIXEL_TOLERANCE = 1e-3


@dataclass
class MaskGITVQEncoderOutput(BaseOutput):
    """
    Output of [`MaskGITVQModel.encode`].

    Args:
        latents (`torch.Tensor` of shape `(batch_size, latent_channels, h, w)`): encoder output before quantisation.
        quantized_latents (`torch.Tensor` of shape `(batch_size, latent_channels, h, w)`): the selected codebook
            vectors; in training mode a straight-through estimate, so gradients reach the encoder.
        indices (`torch.LongTensor` of shape `(batch_size, h * w)`): code ids, row-major over the latent grid.
    """

    latents: torch.Tensor
    quantized_latents: torch.Tensor
    indices: torch.LongTensor


@dataclass
class MaskGITVQModelOutput(BaseOutput):
    """
    Output of [`MaskGITVQModel.forward`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): the reconstruction (clamped to
            [0, 1] in eval mode, unclamped in training mode so that every pixel receives gradients).
        indices (`torch.LongTensor` of shape `(batch_size, h * w)`): code ids of the input images.
        quantizer_loss (`torch.Tensor`, *optional*): `codebook_loss + commitment_loss`; training mode only.
        codebook_loss (`torch.Tensor`, *optional*): `mse(z_q, sg(z))`, moves the codebook towards the encoder output.
        commitment_loss (`torch.Tensor`, *optional*): `commitment_cost * mse(sg(z_q), z)`, keeps the encoder close to
            its codes.
    """

    sample: torch.Tensor
    indices: torch.LongTensor
    quantizer_loss: torch.Tensor | None = None
    codebook_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None


class MaskGITResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with the official MaskGIT quirks (no conv biases, shortcut on `h`)."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        # Official quirk: the shortcut maps out->out and is applied to the block *output*, so a block that
        # changes the channel count discards its input entirely. Kept for weight compatibility and parity.
        self.nin_shortcut = (
            nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


def _res_blocks(in_channels: int, out_channels: int, num_blocks: int, groups: int, eps: float) -> nn.ModuleList:
    channels = [in_channels] + [out_channels] * num_blocks
    return nn.ModuleList(MaskGITResnetBlock(channels[j], out_channels, groups, eps) for j in range(num_blocks))


class MaskGITDownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_res_blocks, norm_num_groups, norm_eps, add_downsample):
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_res_blocks, norm_num_groups, norm_eps)
        self.add_downsample = add_downsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        # Parameter-free 2x2 average pooling, not a strided convolution as in taming-transformers.
        return F.avg_pool2d(h, kernel_size=2, stride=2) if self.add_downsample else h


class MaskGITUpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_res_blocks, norm_num_groups, norm_eps, add_upsample):
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_res_blocks, norm_num_groups, norm_eps)
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) if add_upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        if self.upsample_conv is not None:
            h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class MaskGITEncoder(nn.Module):
    def __init__(self, in_channels, hidden_channels, channel_mult, num_res_blocks, latent_channels, groups, eps):
        super().__init__()
        widths = [hidden_channels * m for m in channel_mult]
        in_widths = [hidden_channels] + widths[:-1]
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1, bias=False)
        # Every level but the last halves the resolution.
        self.down = nn.ModuleList(
            MaskGITDownBlock(in_widths[i], widths[i], num_res_blocks, groups, eps, i != len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid = _res_blocks(widths[-1], widths[-1], num_res_blocks, groups, eps)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], latent_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for block in [*self.down, *self.mid]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITDecoder(nn.Module):
    def __init__(self, out_channels, hidden_channels, channel_mult, num_res_blocks, latent_channels, groups, eps):
        super().__init__()
        widths = [hidden_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = _res_blocks(widths[-1], widths[-1], num_res_blocks, groups, eps)
        # `up[i]` is resolution level i (as in the official keys); it is run from the coarsest level down.
        self.up = nn.ModuleList(
            MaskGITUpBlock(widths[min(i + 1, len(widths) - 1)], widths[i], num_res_blocks, groups, eps, i != 0)
            for i in range(len(widths))
        )
        self.norm_out = nn.GroupNorm(groups, widths[0], eps=eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latents)
        for block in [*self.mid, *reversed(self.up)]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITVectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (no EMA, no normalisation), as in the official tokenizer."""

    def __init__(self, codebook_size: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embedding_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """Returns `z_q` laid out like `latents` (B, C, h, w) and the row-major indices (B, h * w)."""
        batch, channels, height, width = latents.shape
        codebook_t = self.embedding.weight.t()
        # In the codebook's dtype: a half-precision encoder's latents meet a float32 codebook (`_keep_in_fp32_modules`).
        flat = latents.permute(0, 2, 3, 1).reshape(-1, channels).to(codebook_t.dtype)
        # Same evaluation order as the official |z|^2 + |e|^2 - 2 z.e, so near-ties resolve identically.
        distances = torch.addmm(
            flat.pow(2).sum(1, keepdim=True) + codebook_t.pow(2).sum(0, keepdim=True), flat, codebook_t, alpha=-2.0
        )
        indices = distances.argmin(dim=1).reshape(batch, height * width)
        return self.lookup(indices, (height, width)), indices

    def lookup(self, indices: torch.LongTensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Maps indices (B, h * w) to codebook vectors laid out as (B, C, h, w)."""
        return self.embedding(indices).reshape(indices.shape[0], *latent_size, -1).permute(0, 3, 1, 2).contiguous()


class MaskGITVQModel(ModelMixin, ConfigMixin):
    r"""
    The MaskGIT-VQGAN tokenizer: images in [0, 1] <-> discrete codes on a grid downsampled by
    `2 ** (len(channel_mult) - 1)`. The defaults are the official ImageNet model (f = 16, 256x256 -> 16x16 codes).

    Parameters:
        in_channels (`int`, defaults to 3): channels of the input images.
        out_channels (`int`, defaults to 3): channels of the decoded images.
        hidden_channels (`int`, defaults to 128): width of the first resolution level.
        channel_mult (`tuple[int]`, defaults to `(1, 1, 2, 2, 4)`): width multiplier of each resolution level.
        num_res_blocks (`int`, defaults to 2): residual blocks per level and in each `mid` stage.
        latent_channels (`int`, defaults to 256): channels of the latent grid, equal to the codebook vector size.
        codebook_size (`int`, defaults to 1024): number of codebook vectors.
        commitment_cost (`float`, defaults to 0.25): weight of the commitment loss.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups.
        norm_eps (`float`, defaults to 1e-6): GroupNorm epsilon.
        sample_size (`int` or `tuple[int, int]`, defaults to 256): image size used to infer the latent grid of
            [`~MaskGITVQModel.decode`] when no `latent_size` is given.
        decode_batch_size (`int`, defaults to 32): largest batch decoded at once; bigger batches are decoded in
            slices to bound memory.

    Precision: the decoding path stays in float32 (`_keep_in_fp32_modules`: the codebook and the decoder). It costs
    little next to the generator, and half precision moves the decoded pixels: with bfloat16 weights and compute, 29%
    of the 8-bit pixel values of the shipped tiny-digits tokenizer change (by up to 4 levels) and 40% of a random
    official-size one's (by up to 30 levels); bfloat16-rounded weights alone, computed in float32, still change 22% /
    29% of them. So `from_pretrained(..., dtype=torch.bfloat16)` (also through `RARPipeline.from_pretrained`) keeps the
    codebook and the decoder in float32 and decoding tokens gives the float32 images, while the encoder follows the
    requested dtype (its latents are compared with the codebook in float32). `.to(dtype)` casts every module, as for
    any diffusers model (diffusers warns, naming these modules): load with `dtype=` instead.
    """

    # What turns tokens into pixels (see "Precision" above); the encoder follows the dtype it is given.
    _keep_in_fp32_modules = ["quantize", "decoder"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        hidden_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        latent_channels: int = 256,
        codebook_size: int = 1024,
        commitment_cost: float = 0.25,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        sample_size: int | tuple[int, int] = 256,
        decode_batch_size: int = 32,
    ):
        super().__init__()
        args = (hidden_channels, tuple(channel_mult), num_res_blocks, latent_channels, norm_num_groups, norm_eps)
        self.encoder = MaskGITEncoder(in_channels, *args)
        self.decoder = MaskGITDecoder(out_channels, *args)
        self.quantize = MaskGITVectorQuantizer(codebook_size, latent_channels)

    @property
    def downsample_factor(self) -> int:
        """Ratio between the image size and the latent grid size."""
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def codebook_size(self) -> int:
        """Number of codebook vectors (valid indices are `0 .. codebook_size - 1`)."""
        return self.config.codebook_size

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}")
        if images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must have {self.config.in_channels} channels, got {images.shape[1]}")
        f, (height, width) = self.downsample_factor, images.shape[2:]
        if height % f or width % f:
            raise ValueError(
                f"image height and width must be divisible by the downsampling factor {f}, got {height}x{width}"
            )
        low, high = (value.item() for value in torch.aminmax(images))
        if low < -_PIXEL_TOLERANCE or high > 1 + _PIXEL_TOLERANCE:
            raise ValueError(f"pixel values must be in [0, 1] (not [-1, 1]), got values in [{low:.4g}, {high:.4g}]")

    def _quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor]:
        self._check_images(images)
        latents = self.encoder(images)
        quantized, indices = self.quantize(latents)
        return latents, quantized, indices

    @apply_forward_hook
    def encode(self, images: torch.Tensor, return_dict: bool = True) -> MaskGITVQEncoderOutput | tuple:
        """
        Encodes images into latents and discrete codes.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): pixels in [0, 1]; height and
                width must be multiples of `downsample_factor`.
            return_dict (`bool`, defaults to `True`): return a [`MaskGITVQEncoderOutput`] instead of a tuple.

        Returns:
            [`MaskGITVQEncoderOutput`] or `(latents, quantized_latents, indices)`.
        """
        latents, quantized, indices = self._quantize(images)
        if self.training:
            quantized = latents + (quantized - latents).detach()  # straight-through estimator
        if not return_dict:
            return latents, quantized, indices
        return MaskGITVQEncoderOutput(latents=latents, quantized_latents=quantized, indices=indices)

    def _latent_size(self, num_tokens: int, latent_size: tuple[int, int] | None) -> tuple[int, int]:
        if latent_size is not None:
            height, width = latent_size
            if height * width != num_tokens:
                raise ValueError(f"latent_size {(height, width)} holds {height * width} tokens, not {num_tokens}")
            return height, width
        sample = self.config.sample_size
        sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
        grid = (sample_h // self.downsample_factor, sample_w // self.downsample_factor)
        if grid[0] * grid[1] == num_tokens:
            return grid
        side = math.isqrt(num_tokens)
        if side * side == num_tokens:
            return side, side
        raise ValueError(
            f"cannot infer the latent grid of {num_tokens} tokens (the config grid is {grid[0]}x{grid[1]}); "
            "pass latent_size=(h, w)"
        )

    @apply_forward_hook
    def decode(
        self,
        indices: torch.LongTensor,
        latent_size: tuple[int, int] | None = None,
        clamp: bool = True,
        decode_batch_size: int | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple:
        """
        Decodes code ids into images.

        Args:
            indices (`torch.LongTensor` of shape `(batch_size, h * w)` or `(batch_size, h, w)`): code ids, row-major.
            latent_size (`tuple[int, int]`, *optional*): the latent grid `(h, w)` of flat indices. Defaults to the grid
                of `config.sample_size` when the token count matches, else to a square grid.
            clamp (`bool`, defaults to `True`): clamp the images to [0, 1] as the official decoder does.
            decode_batch_size (`int`, *optional*): largest batch decoded at once (`config.decode_batch_size`).
            return_dict (`bool`, defaults to `True`): return a [`DecoderOutput`] instead of a tuple.

        Returns:
            [`DecoderOutput`] or `(sample,)`: images of shape `(batch_size, out_channels, h * f, w * f)`.
        """
        if indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}; use decode_latents for latents")
        if indices.ndim == 3:
            latent_size, indices = tuple(indices.shape[1:]), indices.flatten(1)
        elif indices.ndim != 2:
            raise ValueError(f"indices must have shape (batch, h * w) or (batch, h, w), got {tuple(indices.shape)}")
        low, high = (indices.min().item(), indices.max().item()) if indices.numel() else (0, 0)
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"indices must be in [0, {self.codebook_size}), got values in [{low}, {high}]")
        quantized = self.quantize.lookup(indices, self._latent_size(indices.shape[1], latent_size))
        return self.decode_latents(quantized, clamp, decode_batch_size, return_dict)

    @apply_forward_hook
    def decode_latents(
        self,
        quantized_latents: torch.Tensor,
        clamp: bool = True,
        decode_batch_size: int | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple:
        """
        Decodes (quantised) latents into images.

        Args:
            quantized_latents (`torch.Tensor` of shape `(batch_size, latent_channels, h, w)`): codebook vectors.
            clamp (`bool`, defaults to `True`): clamp the images to [0, 1] as the official decoder does.
            decode_batch_size (`int`, *optional*): largest batch decoded at once (`config.decode_batch_size`).
            return_dict (`bool`, defaults to `True`): return a [`DecoderOutput`] instead of a tuple.

        Returns:
            [`DecoderOutput`] or `(sample,)`.
        """
        channels, shape = self.config.latent_channels, tuple(quantized_latents.shape)
        if len(shape) != 4 or shape[1] != channels:
            raise ValueError(f"latents must have shape (batch, {channels}, h, w), got {shape}")
        step = decode_batch_size or self.config.decode_batch_size
        if step < 1:
            raise ValueError(f"decode_batch_size must be a positive integer, got {step}")
        sample = torch.cat([self.decoder(chunk) for chunk in quantized_latents.split(step)])
        if clamp:
            sample = sample.clamp(0.0, 1.0)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> MaskGITVQModelOutput | tuple:
        """
        Reconstructs images; in training mode also returns the quantiser losses.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): pixels in [0, 1].
            return_dict (`bool`, defaults to `True`): return a [`MaskGITVQModelOutput`] instead of a tuple.

        Returns:
            [`MaskGITVQModelOutput`] or `(sample, indices, quantizer_loss, codebook_loss, commitment_loss)`.
        """
        latents, quantized, indices = self._quantize(images)
        codebook_loss = commitment_loss = quantizer_loss = None
        if self.training:
            # Standard VQ-VAE weighting. (The official code weights the two terms the other way round, with
            # commitment_cost on the codebook term; it only matters for training, not for inference parity.)
            codebook_loss = F.mse_loss(quantized, latents.detach())
            commitment_loss = self.config.commitment_cost * F.mse_loss(quantized.detach(), latents)
            quantizer_loss = codebook_loss + commitment_loss
            quantized = latents + (quantized - latents).detach()  # straight-through estimator
        # Clamping would zero the gradient of every out-of-range pixel, so training sees the raw output.
        sample = self.decode_latents(quantized, clamp=not self.training).sample
        if not return_dict:
            return sample, indices, quantizer_loss, codebook_loss, commitment_loss
        return MaskGITVQModelOutput(sample, indices, quantizer_loss, codebook_loss, commitment_loss)
