"""Autoencoder detectors: ``ae`` (L2) and ``ae_ssim`` (Bergmann et al. 2019).

Both hold :class:`anomalykit.generative.ae.AutoEncoder` and differ in the loss
and the map: ``ae`` trains with MSE and maps the per-pixel squared error;
``ae_ssim`` trains with 1 - SSIM and maps 1 - local SSIM, which reacts to
structure rather than intensity and so is less fooled by slight blur.

AE-SSIM in the paper trains on 128x128 patches of 256x256 images and scores
with a sliding window (stride 32): ``patch_size`` / ``patch_stride`` do the
same here (training on random crops, inference by tiling with averaged
overlaps), all with static shapes so the tiling exports to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector, check_choice
from anomalykit.errors import ConfigError
from anomalykit.generative.ae import (
    BERGMANN_STRIDES,
    BERGMANN_WIDTHS,
    LOSSES,
    AutoEncoder,
    ReconstructionLoss,
    reconstruction_error_map,
    reconstruction_loss,
)
from anomalykit.nn.functional import MAP_REDUCTIONS, MapReduction, gaussian_blur, reduce_map
from anomalykit.registry import register_detector


def tile_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with windows of ``patch``; the last one is flush right."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def random_crops(images: Tensor, patch: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, C, S, S) -> (B, C, patch, patch), an independent random crop per image."""
    b, _, h, w = images.shape
    ys = torch.randint(0, h - patch + 1, (b,), generator=generator).tolist()
    xs = torch.randint(0, w - patch + 1, (b,), generator=generator).tolist()
    return torch.stack([img[:, y:y + patch, x:x + patch] for img, y, x in zip(images, ys, xs, strict=True)])


@register_detector("ae")
class AEDetector(Detector):
    """Convolutional autoencoder; anomaly map = reconstruction error per pixel.

    Args:
        image_size: side S of the (square) input.
        latent_dim, widths, strides, batch_norm: the :class:`AutoEncoder`'s.
        loss: "l2" (``ae``) or "ssim" (``ae_ssim``); also "l1". The map uses the same measure.
        patch_size: train on random crops of this size and score by tiling (None = whole image).
        patch_stride: tiling stride at inference (default patch_size // 4, the paper's 32 for 128).
        map_sigma: Gaussian smoothing of the map, in pixels of the input (0 = none).
        score_reduction: image score = "max" or "mean" of the smoothed map.
        ssim_window: SSIM window size (11 in the paper).
        lr, weight_decay: Adam.
    """

    def __init__(self, image_size: int = 64, *, latent_dim: int = 100,
                 widths: list[int] | tuple[int, ...] = BERGMANN_WIDTHS,
                 strides: list[int] | tuple[int, ...] = BERGMANN_STRIDES,
                 batch_norm: bool = False, loss: ReconstructionLoss = "l2",
                 patch_size: int | None = None, patch_stride: int | None = None,
                 map_sigma: float = 2.0, score_reduction: MapReduction = "max",
                 ssim_window: int = 11, lr: float = 2e-4, weight_decay: float = 0.0) -> None:
        super().__init__()
        check_choice("loss", loss, LOSSES)
        check_choice("score_reduction", score_reduction, MAP_REDUCTIONS)
        patch = image_size if patch_size is None else patch_size
        if not 0 < patch <= image_size:
            raise ConfigError(f"patch_size {patch_size} must be in (0, image_size={image_size}]")
        self.image_size, self.patch_size = image_size, patch
        self.patch_stride = patch_stride or max(1, patch // 4)
        self.loss, self.map_sigma, self.score_reduction = loss, map_sigma, score_reduction
        self.ssim_window = ssim_window
        self.set_normalization("none")  # sigmoid decoder: the model works in [0, 1]
        self.autoencoder = AutoEncoder(patch, latent_dim=latent_dim, widths=widths,
                                       strides=strides, batch_norm=batch_norm, loss=loss,
                                       ssim_window=ssim_window, lr=lr, weight_decay=weight_decay)

    def training_step(self, batch) -> dict[str, Tensor]:
        x = self.normalize_input(batch["image"])
        if self.patch_size < self.image_size:
            x = random_crops(x, self.patch_size)
        recon = self.autoencoder(x)
        return {"loss": reconstruction_loss(x, recon, self.loss, ssim_window=self.ssim_window)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.autoencoder.configure_optimizers()

    def error_map(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, 1, S, S) raw error map (tiled when patching)."""
        if self.patch_size == self.image_size:
            return reconstruction_error_map(x, self.autoencoder(x), self.loss,
                                            ssim_window=self.ssim_window)
        # All tiles go through the network as one batch (one copy of the network in the
        # exported graph instead of one per tile), then are padded back into place.
        p, s, b = self.patch_size, self.image_size, x.shape[0]
        starts = [(y, xx) for y in tile_starts(s, p, self.patch_stride)
                  for xx in tile_starts(s, p, self.patch_stride)]
        tiles = torch.cat([x[:, :, y:y + p, xx:xx + p] for y, xx in starts])
        errors = reconstruction_error_map(tiles, self.autoencoder(tiles), self.loss,
                                          ssim_window=self.ssim_window)
        total = x.new_zeros(b, 1, s, s)
        count = x.new_zeros(1, 1, s, s)
        ones = x.new_ones(1, 1, p, p)
        for i, (y, xx) in enumerate(starts):
            pad = (xx, s - p - xx, y, s - p - y)
            total = total + F.pad(errors[i * b:(i + 1) * b], pad)
            count = count + F.pad(ones, pad)
        return total / count

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S)."""
        amap = gaussian_blur(self.error_map(self.normalize_input(images)), self.map_sigma)
        return AnomalyOutput(reduce_map(amap, self.score_reduction), amap)


@register_detector("ae_ssim")
class AESSIMDetector(AEDetector):
    """AE-SSIM (Bergmann et al. 2019): the autoencoder trained with 1 - SSIM, map = 1 - local SSIM.

    Same arguments as :class:`AEDetector`; only the defaults differ (loss "ssim").
    """

    def __init__(self, image_size: int = 128, *, loss: ReconstructionLoss = "ssim", **kwargs) -> None:
        super().__init__(image_size, loss=loss, **kwargs)
