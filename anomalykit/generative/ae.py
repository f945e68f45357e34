"""Convolutional autoencoder (Bergmann et al. 2019 layout) as a generative model.

Encoder: a stack of 4x4 stride-2 and 3x3 stride-1 convolutions with LeakyReLU
0.2 (default widths 32-32-32-64-64-128-64-32, the AE-SSIM paper's), then a
"dense" bottleneck: one convolution whose kernel covers the whole remaining
feature map, giving a (B, latent_dim, 1, 1) code. The decoder mirrors it with
transposed convolutions and ends in a sigmoid, so images live in [0, 1].

Usable on its own: ``fit`` (the toolkit loop), ``encode``/``decode``,
``reconstruct``, ``score`` (per-image reconstruction error) and ``sample``
(decode draws from a diagonal Gaussian fitted to the training codes at the end of
``fit``, in the ``on_fit_end`` hook; an autoencoder has no prior of its own).

Two variants train the same network on corrupted inputs:

* ``denoising_ae`` (Vincent et al. 2008): Gaussian noise of std ``noise_std`` and/or
  salt-and-pepper on a fraction ``salt_pepper`` of the pixels, loss against the clean image.
* ``masked_ae`` (MAE-style, He et al. 2022, with a conv network instead of a ViT): a
  fraction ``mask_ratio`` of the ``patch_size`` x ``patch_size`` patches is replaced by zeros
  (or a learned per-channel fill) and the loss counts the masked patches only.

The encoder and decoder are :mod:`anomalykit.nn.conv`'s :class:`ConvEncoder` /
:class:`ConvDecoder` (built from its ``conv_stack`` / ``deconv_stack``), which the VAE and
VQ-VAE reuse.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError
from anomalykit.nn.conv import ConvDecoder, ConvEncoder, check_layout
from anomalykit.nn.functional import reduce_map, ssim_map
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


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``; a CPU ``generator`` works for any device."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _rand(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=like.dtype).to(like.device)


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
        check_layout(image_size, widths, strides)
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
        return reduce_map(err, "mean")

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        return {"loss": reconstruction_loss(x, self.reconstruct(x), self.loss,
                                            ssim_window=self.ssim_window)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_fit_end(self, train_data) -> None:
        """Loop hook: fit the latent prior that :meth:`sample` draws from on the training data."""
        self.fit_latent_prior(train_data)

    @torch.no_grad()
    def fit_latent_prior(self, data, batch_size: int = 64) -> None:
        """Fit the diagonal Gaussian that :meth:`sample` draws codes from."""
        from anomalykit.training.inference import as_loader, evaluating

        with evaluating(self):
            codes = torch.cat([self.encode(b["image"].to(self.device))
                               for b in as_loader(data, batch_size=batch_size)])
        self.latent_mean_.copy_(codes.mean(0))
        self.latent_std_.copy_(codes.std(0, unbiased=False).clamp_min(1e-6))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) decoded from codes drawn from the fitted latent Gaussian."""
        eps = torch.randn(n, self.latent_mean_.numel(), generator=generator).to(self.device)
        return self.decode(self.latent_mean_ + eps * self.latent_std_)


@register_generative("denoising_ae")
class DenoisingAutoEncoder(AutoEncoder):
    """Denoising autoencoder (Vincent et al. 2008): reconstruct the clean image from a corrupted one.

    Training corrupts the input with :meth:`corrupt`; the loss compares the reconstruction
    with the clean image. ``reconstruct`` / ``score`` / ``sample`` see clean inputs.

    Args:
        image_size: S.
        noise_std: std of the additive Gaussian noise (0 = none); the result is clamped to [0, 1].
        salt_pepper: fraction of pixel positions set to 0 or 1 (all channels), 0 = none.
        **kwargs: the :class:`AutoEncoder`'s arguments.
    """

    def __init__(self, image_size: int = 64, *, noise_std: float = 0.1, salt_pepper: float = 0.0,
                 **kwargs) -> None:
        super().__init__(image_size, **kwargs)
        if noise_std < 0 or not 0.0 <= salt_pepper <= 1.0:
            raise ConfigError(f"noise_std must be >= 0 and salt_pepper in [0, 1]; got "
                              f"noise_std={noise_std}, salt_pepper={salt_pepper}")
        self.noise_std, self.salt_pepper = noise_std, salt_pepper

    def corrupt(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, S, S) in [0, 1] -> the corrupted copy, still in [0, 1]."""
        noisy = x
        if self.noise_std > 0:
            noisy = (noisy + self.noise_std * randn_like(x, generator)).clamp(0.0, 1.0)
        if self.salt_pepper > 0:
            b, _, h, w = x.shape
            hit = _rand((b, 1, h, w), x, generator) < self.salt_pepper
            salt = (_rand((b, 1, h, w), x, generator) < 0.5).to(x.dtype)
            noisy = torch.where(hit, salt.expand_as(noisy), noisy)
        return noisy

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        recon = self.decode(self.encode(self.corrupt(x)))
        return {"loss": reconstruction_loss(x, recon, self.loss, ssim_window=self.ssim_window)}


@register_generative("masked_ae")
class MaskedAutoEncoder(AutoEncoder):
    """Masked autoencoder: reconstruct randomly masked patches from the visible ones.

    Training: per image, exactly ``round(mask_ratio * N)`` of the N patches of
    ``patch_size`` x ``patch_size`` pixels are masked (MAE's random sampling without
    replacement), masked pixels are replaced by 0 (or a learned per-channel value with
    ``learned_fill``), and the loss (the :class:`AutoEncoder`'s measure) is averaged over the
    masked pixels only.

    Test time (``reconstruct``, hence ``score``): with ``test_draws=0`` (default) the
    unmasked image is encoded once. With ``test_draws=k > 0`` the image is reconstructed
    under k mask draws (seeded, so deterministic) and every pixel takes the mean of the
    outputs of the draws in which it was masked, i.e. it is always *predicted from context*
    (pixels no draw masked take the mean over all draws).

    Args:
        image_size: S, a multiple of ``patch_size``.
        in_channels: C.
        mask_ratio: fraction of patches masked while training, in (0, 1).
        patch_size: side of a square patch.
        learned_fill: a learned per-channel value for masked pixels instead of 0.
        test_draws: number of mask draws averaged by ``reconstruct`` (0 = no masking).
        **kwargs: the :class:`AutoEncoder`'s arguments.
    """

    def __init__(self, image_size: int = 64, *, in_channels: int = 3, mask_ratio: float = 0.5,
                 patch_size: int = 8, learned_fill: bool = False, test_draws: int = 0,
                 **kwargs) -> None:
        super().__init__(image_size, in_channels=in_channels, **kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1); got {mask_ratio}")
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError(f"patch_size {patch_size} must divide image_size {image_size}")
        if test_draws < 0:
            raise ConfigError(f"test_draws must be >= 0; got {test_draws}")
        self.mask_ratio, self.patch_size, self.test_draws = mask_ratio, patch_size, test_draws
        self.grid = image_size // patch_size
        patches = self.grid ** 2
        self.num_masked = min(max(1, round(mask_ratio * patches)), max(1, patches - 1))
        self.fill = nn.Parameter(torch.zeros(in_channels)) if learned_fill else None

    def random_mask(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, 1, S, S) in {0, 1}, 1 = masked: ``num_masked`` random patches per image."""
        noise = torch.rand(n, self.grid ** 2, generator=generator)
        ranks = noise.argsort(dim=1).argsort(dim=1)  # a uniformly random permutation per row
        mask = (ranks < self.num_masked).to(self.latent_mean_.dtype).view(n, 1, self.grid, self.grid)
        p = self.patch_size
        return mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3).to(self.device)

    def mask_input(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace the masked pixels of (B, C, S, S) by 0 or the learned fill."""
        visible = x * (1.0 - mask)
        if self.fill is None:
            return visible
        return visible + self.fill.view(1, -1, 1, 1) * mask

    def inpaint(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, C, S, S) reconstruction of ``x`` seen through ``mask`` (B, 1, S, S)."""
        return self.decode(self.encode(self.mask_input(x, mask)))

    def masked_loss(self, x: Tensor, recon: Tensor, mask: Tensor) -> Tensor:
        """Scalar: the per-pixel error under ``loss`` averaged over masked pixels only."""
        err = reconstruction_error_map(x, recon, self.loss, ssim_window=self.ssim_window)
        return (err * mask).sum() / mask.sum().clamp_min(1.0)

    def training_step(self, batch) -> dict[str, Tensor]:
        x = batch["image"]
        mask = self.random_mask(x.shape[0])
        return {"loss": self.masked_loss(x, self.inpaint(x, mask), mask)}

    def reconstruct(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, S, S): unmasked decode, or the masked-pixel average over ``test_draws`` draws."""
        if self.test_draws == 0:
            return self.decode(self.encode(x))
        generator = generator or torch.Generator().manual_seed(0)
        total = torch.zeros_like(x)
        plain = torch.zeros_like(x)
        count = x.new_zeros(x.shape[0], 1, *x.shape[2:])
        for _ in range(self.test_draws):
            mask = self.random_mask(x.shape[0], generator=generator)
            recon = self.inpaint(x, mask)
            total = total + recon * mask
            plain = plain + recon
            count = count + mask
        return torch.where(count > 0, total / count.clamp_min(1.0), plain / self.test_draws)
