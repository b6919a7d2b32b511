"""The TensorFlow FID Inception-v3 graph in plain PyTorch (no torchvision).

This is the network of ``classify_image_graph_def.pb`` (``inception-2015-12-05``), the graph that the ADM
evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) and every TF FID implementation run. It
differs from torchvision's Inception-v3 in the ways pytorch-fid's ``FIDInception*`` blocks patch:

- the 3x3 average pools inside the Inception blocks ignore the zero padding (``count_include_pad=False``);
- the pool branch of the last block (``Mixed_7c``, ``mixed_10`` in TF) uses a max pool, not an average pool;
- the classifier has 1008 outputs.

The input pipeline follows the TF graph rather than pytorch-fid: images in [0, 255] are resized to 299x299
with TF1's ``ResizeBilinear`` (``align_corners=False`` without half-pixel centres, which torch's
``interpolate`` cannot express) and then mapped with ``(x - 128) / 128``.

Outputs are the three tensors the ADM evaluator reads:

- ``pool``: ``pool_3:0``, the 2048-d global average pool (FID, precision, recall);
- ``spatial``: ``mixed_6/conv:0``, the ReLU output of the 1x1 branch of ``Mixed_6d`` (17x17x192), of which
  ADM keeps the first 7 channels and flattens them in NHWC order, 7 * 17 * 17 = 2023 values (sFID);
- ``logits``: ``pool @ fc.weight.T`` *without* the bias, the ``softmax/logits/MatMul`` tensor ADM feeds
  to the softmax for the Inception Score.

Weights: the public pytorch-fid port of the TF graph,
``pt_inception-2015-12-05-6726825d.pth`` (:data:`PYTORCH_FID_WEIGHTS_URL`). torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` uses the same key names and loads too. Keys follow
torchvision's ``Inception3`` without ``AuxLogits``: ``Conv2d_1a_3x3.conv.weight``,
``Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}``, ..., ``Mixed_5b.branch1x1.conv.weight``, ...,
``fc.weight`` (1008, 2048), ``fc.bias`` (1008). TF names map as ``conv``..``conv_4`` -> ``Conv2d_1a_3x3`` ..
``Conv2d_4a_3x3``, ``mixed``..``mixed_10`` -> ``Mixed_5b`` .. ``Mixed_7c`` (so ``mixed_6`` is ``Mixed_6d``),
``<scope>/conv2d_params`` -> ``.conv.weight`` (HWIO -> OIHW), ``<scope>/batchnorm/{gamma,beta,moving_mean,
moving_variance}`` -> ``.bn.{weight,bias,running_mean,running_var}``, ``softmax/{weights,biases}`` -> ``fc``.
A ``.safetensors`` file with the same keys also loads.

Offline use: put ``pt_inception-2015-12-05-6726825d.pth`` in torch.hub's checkpoint folder
(:func:`cached_weights_path`, ``$TORCH_HOME/hub/checkpoints/``, by default ``~/.cache/torch/hub/checkpoints/``), where
``from_pretrained()`` finds it without a path and ``download=True`` would have saved it; or pass its path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import load_state_dict_file

PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILENAME = PYTORCH_FID_WEIGHTS_URL.rsplit("/", 1)[-1]
WEIGHTS_WHAT = "FID Inception weights file"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


@dataclass
class InceptionFeatures:
    """Activations of the ADM evaluator for a batch of images (all float32).

    Attributes:
        pool: ``(B, 2048)`` ``pool_3`` features.
        spatial: ``(B, 2023)`` first 7 channels of ``mixed_6/conv`` (17x17), flattened in NHWC order.
        logits: ``(B, 1008)`` classifier logits without the bias, as ADM's Inception Score uses them.
    """

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


class BasicConv2d(nn.Module):
    """Bias-free convolution, batch norm (TF's epsilon 1e-3) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b`` .. ``Mixed_5d``)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (``Mixed_6a``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``Mixed_6b`` .. ``Mixed_6e``)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs; the first is TF's ``mixed_N/conv`` (ADM's sFID reads it in ``Mixed_6d``)."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (``Mixed_7a``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions (``Mixed_7b``, ``Mixed_7c``).

    ``pool="max"`` reproduces the TF graph's ``Mixed_7c`` (``mixed_10``), whose pool branch is a max pool.
    """

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` with ``align_corners=False`` and ``half_pixel_centers=False``.

    The source coordinate of output pixel ``i`` is ``i * in_size / out_size`` (no half-pixel offset), which is
    what the FID graph does to its input; torch's ``interpolate`` always uses half-pixel centres.
    """
    height, width = images.shape[-2:]

    def sample_points(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(in_size / size, dtype=torch.float32, device=images.device)
        source = torch.arange(size, dtype=torch.float32, device=images.device) * scale
        lower = source.floor()
        upper = (lower + 1).clamp(max=in_size - 1)
        return lower.long(), upper.long(), (source - lower).to(images.dtype)

    y0, y1, dy = sample_points(height)
    x0, x1, dx = sample_points(width)
    top, bottom = images[..., y0, :], images[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF FID graph, returning the ADM evaluator's activations.

    Module names follow torchvision's ``Inception3`` so the pytorch-fid weights load as they are. A freshly
    constructed model has random weights (enough for shape tests only); use :meth:`from_pretrained` for
    meaningful metrics.

    Example:
        >>> model = FIDInceptionV3.from_pretrained("pt_inception-2015-12-05-6726825d.pth")
        >>> features = model(images_uint8_nchw)  # or float images in [0, 1]
        >>> features.pool.shape, features.spatial.shape, features.logits.shape
        (torch.Size([B, 2048]), torch.Size([B, 2023]), torch.Size([B, 1008]))
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init keeps random-weight activations O(1) through the 48 ReLU layers, so that tests
                # on a random network see non-degenerate features.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, download: bool = False) -> FIDInceptionV3:
        """Load the FID Inception weights and return the model in eval mode without gradients.

        Args:
            path: a local ``.pth`` (e.g. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, read with
                ``torch.load(weights_only=True)``) or ``.safetensors`` file with the keys described in the
                module docstring. Default: the file at :func:`cached_weights_path`, when it is there.
            download: when ``path`` is None and the file is not at :func:`cached_weights_path`, download
                :data:`PYTORCH_FID_WEIGHTS_URL` there. Nothing is downloaded unless this is True.
        """
        cached = cached_weights_path()
        if path is None and not cached.is_file():
            if not download:
                raise FileNotFoundError(
                    f"no FID Inception weights: put {WEIGHTS_FILENAME} (from {PYTORCH_FID_WEIGHTS_URL}) in "
                    f"{cached.parent} for offline use, pass its path, or allow the download (download=True)"
                )
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(PYTORCH_FID_WEIGHTS_URL, str(cached))
            except OSError as error:  # URLError, no route, DNS: offline
                raise OSError(
                    f"could not download the FID Inception weights from {PYTORCH_FID_WEIGHTS_URL} (offline?): "
                    f"{error}; download them elsewhere and put them in {cached.parent} or pass their path"
                ) from error
        path = cached if path is None else path
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}; get {WEIGHTS_FILENAME} from {PYTORCH_FID_WEIGHTS_URL}"
            )
        state_dict = load_state_dict_file(path, WEIGHTS_WHAT)
        # Build without the random init (24M parameters), then fill every tensor from the file.
        with torch.device("meta"):
            model = cls()
        model = model.to_empty(device="cpu")
        for key, buffer in model.state_dict().items():
            # Files converted before BatchNorm counted batches lack `num_batches_tracked`; eval mode ignores it.
            if key.endswith("num_batches_tracked") and key not in state_dict:
                state_dict[key] = torch.zeros_like(buffer)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} is not an FID Inception state dict: "
                f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        return model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        """Compute the ADM activations of ``images``.

        Args:
            images: ``(B, 3, H, W)``; uint8 in [0, 255] or floating point in [0, 1]. Any size: images are
                resized to 299x299 as the TF graph does.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128

        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(torch.cat(branches, dim=1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        return InceptionFeatures(pool=pool, spatial=spatial, logits=pool @ self.fc.weight.T)


def cached_weights_path() -> Path:
    """Where the FID Inception weights are looked for without a path: torch.hub's checkpoint folder
    (``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
