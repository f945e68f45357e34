"""Convolutional autoencoder (Bergmann et al. 2019 layout) as a generative model.

Encoder: a stack of 4x4 stride-2 and 3x3 stride-1 convolutions with LeakyReLU
0.2 (default widths 32-32-32-64-64-128-64-32, the AE-SSIM paper's), then a
"dense" bottleneck: one convolution whose kernel covers the whole remaining
feature map, giving a (B, latent_dim, 1, 1) code. The decoder mirrors it with
transposed convolutions and ends in a sigmoid, so images live in [0, 1].

Usable on its own: ``fit`` (the toolkit loop), ``encode``/``decode``,
``reconstruct``, ``score`` (per-image reconstruction error) and ``sample``
(decode draws from a diagonal Gaussian fitted to the training codes after
``fit``; an autoencoder has no prior of its own).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError
from anomalykit.nn.functional import ssim_map
from anomalykit.registry import register_generative

ReconstructionLoss = Literal["l2", "l1", "ssim"]
LOSSES = ("l2", "l1", "ssim")

BERGMANN_WIDTHS = (32, 32, 32, 64, 64, 128, 64, 32)
BERGMANN_STRIDES = (2, 2, 1, 2, 1, 2, 1, 1)


def reconstruction_error_map(x: Tensor, recon: Tensor, loss: ReconstructionLoss,
                             *, ssim_window: int = 11) -> Tensor:
    """Per-pixel error (B, 1, H, W) of a reconstruction, channel-averaged."""
    if loss == "l2":
        return (x - recon).pow(2).mean(dim=1, keepdim=True)
    if loss == "l1":
        return (x - recon).abs().mean(dim=1, keepdim=True)
    return 1.0 - ssim_map(x, recon, window_size=ssim_window).mean(dim=1, keepdim=True)


def reconstruction_loss(x: Tensor, recon: Tensor, loss: ReconstructionLoss,
                        *, ssim_window: int = 11) -> Tensor:
    """Scalar training loss: MSE, L1 or 1 - mean SSIM."""
    if loss == "l2":
        return F.mse_loss(recon, x)
    if loss == "l1":
        return F.l1_loss(recon, x)
    return 1.0 - ssim_map(x, recon, window_size=ssim_window).mean()


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class ConvEncoder(nn.Module):
    """(B, C, S, S) -> (B, latent_dim). S must be divisible by 2**(number of stride-2 layers)."""

    def __init__(self, image_size: int, in_channels: int, widths, strides, latent_dim: int,
                 batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for width, stride in zip(widths, strides, strict=True):
            kernel = 4 if stride == 2 else 3
            layers.append(nn.Conv2d(c_in, width, kernel, stride, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(_act())
            c_in = width
        self.features = nn.Sequential(*layers)
        self.bottom = image_size // 2 ** sum(s == 2 for s in strides)
        # The "dense" bottleneck: a kernel covering the whole map is a fully connected layer
        # that stays a convolution (cheap to export, no reshape of dynamic batch sizes).
        self.to_latent = nn.Conv2d(c_in, latent_dim, self.bottom)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_latent(self.features(x)).flatten(1)


class ConvDecoder(nn.Module):
    """(B, latent_dim) -> (B, C, S, S) in [0, 1]: the mirror of :class:`ConvEncoder`."""

    def __init__(self, bottom: int, out_channels: int, widths, strides, latent_dim: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.from_latent = nn.Sequential(nn.ConvTranspose2d(latent_dim, widths[-1], bottom), _act())
        layers: list[nn.Module] = []
        outs = [out_channels, *widths[:-1]]
        for i in reversed(range(len(widths))):
            c_in, c_out, last = widths[i], outs[i], i == 0
            if strides[i] == 2:
                layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, padding=1, bias=last or not batch_norm))
            else:
                layers.append(nn.Conv2d(c_in, c_out, 3, 1, padding=1, bias=last or not batch_norm))
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(_act())
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.features(self.from_latent(z[:, :, None, None])))


@register_generative("ae")
class AutoEncoder(GenerativeModel):
    """Convolutional autoencoder on (B, C, S, S) images in [0, 1].

    Args:
        image_size: S, divisible by 2**(number of stride-2 layers) (16 by default).
        in_channels: C.
        latent_dim: size of the code.
        widths / strides: encoder layers; stride 2 -> 4x4 conv, stride 1 -> 3x3 conv.
        batch_norm: BatchNorm after each hidden convolution (off in the paper).
        loss: training loss, "l2", "l1" or "ssim" (1 - SSIM, 11x11 window).
        lr / weight_decay: Adam.
    """

    def __init__(self, image_size: int = 64, *, in_channels: int = 3, latent_dim: int = 100,
                 widths: list[int] | tuple[int, ...] = BERGMANN_WIDTHS,
                 strides: list[int] | tuple[int, ...] = BERGMANN_STRIDES,
                 batch_norm: bool = False, loss: ReconstructionLoss = "l2",
                 ssim_window: int = 11, lr: float = 2e-4, weight_decay: float = 0.0) -> None:
        super().__init__()
        check_choice("loss", loss, LOSSES)
        if len(widths) != len(strides) or any(s not in (1, 2) for s in strides):
            raise ConfigError(f"widths {list(widths)} and strides {list(strides)} must have the same "
                              "length and strides must be 1 or 2")
        factor = 2 ** sum(s == 2 for s in strides)
        if image_size % factor or image_size < factor:
            raise ConfigError(f"image_size {image_size} must be a multiple of {factor} "
                              f"(2 ** number of stride-2 layers)")
        self.image_size, self.loss, self.ssim_window = image_size, loss, ssim_window
        self.lr, self.weight_decay = lr, weight_decay
        self.encoder = ConvEncoder(image_size, in_channels, widths, strides, latent_dim, batch_norm)
        self.decoder = ConvDecoder(self.encoder.bottom, in_channels, widths, strides, latent_dim,
                                   batch_norm)
        self.register_buffer("latent_mean_", torch.zeros(latent_dim))
        self.register_buffer("latent_std_", torch.ones(latent_dim))

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, C, S, S) in [0, 1]."""
        return self.decoder(z)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def score(self, x: Tensor) -> Tensor:
        """(B,) mean reconstruction error under the training loss; higher = less like the data."""
        err = reconstruction_error_map(x, self.reconstruct(x), self.loss, ssim_window=self.ssim_window)
        return err.flatten(1).mean(1)

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        return {"loss": reconstruction_loss(x, self.reconstruct(x), self.loss,
                                            ssim_window=self.ssim_window)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def fit(self, train_data, val_data=None, **trainer_options):
        history = super().fit(train_data, val_data, **trainer_options)
        self.fit_latent_prior(train_data)
        return history

    @torch.no_grad()
    def fit_latent_prior(self, data, batch_size: int = 64) -> None:
        """Fit the diagonal Gaussian that :meth:`sample` draws codes from."""
        from anomalykit.training.inference import as_loader

        was_training = self.training
        self.eval()
        codes = torch.cat([self.encode(b["image"].to(self.device))
                           for b in as_loader(data, batch_size=batch_size)])
        self.train(was_training)
        self.latent_mean_.copy_(codes.mean(0))
        self.latent_std_.copy_(codes.std(0, unbiased=False).clamp_min(1e-6))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) decoded from codes drawn from the fitted latent Gaussian."""
        eps = torch.randn(n, self.latent_mean_.numel(), generator=generator).to(self.device)
        return self.decode(self.latent_mean_ + eps * self.latent_std_)
