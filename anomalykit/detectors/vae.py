"""VAE detector: reconstruction error of a variational autoencoder's posterior-mean decode.

Holds :class:`anomalykit.generative.vae.VAE`, trained on the (beta-)ELBO. At inference the
image is encoded, the posterior mean mu is decoded (no sampling, so ``forward`` is
deterministic and exports to ONNX exactly) and the per-pixel error between image and decode
is the anomaly map, Gaussian-smoothed; the image score is its max (or mean). The KL prior
regularises the latent space, so an anomaly tends to be decoded as a nearby normal image.
(An & Cho 2015 score with the reconstruction probability, an average over posterior draws;
the posterior-mean error used here is the deterministic simplification.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector, check_choice
from anomalykit.generative.ae import (
    BERGMANN_STRIDES,
    BERGMANN_WIDTHS,
    LOSSES,
    ReconstructionLoss,
    reconstruction_error_map,
)
from anomalykit.generative.vae import VAE, Likelihood
from anomalykit.nn.functional import MAP_REDUCTIONS, MapReduction, gaussian_blur, reduce_map
from anomalykit.registry import register_detector


@register_detector("vae")
class VAEDetector(Detector):
    """Variational autoencoder; anomaly map = error of the posterior-mean reconstruction.

    Args:
        image_size: side S of the (square) input.
        latent_dim, widths, strides, batch_norm, beta, likelihood, sigma: the :class:`VAE`'s.
        map_error: per-pixel error of the map, "l2", "l1" or "ssim" (1 - local SSIM).
        map_sigma: Gaussian smoothing of the map, in pixels (0 = none).
        score_reduction: image score = "max" or "mean" of the smoothed map.
        ssim_window: SSIM window when ``map_error="ssim"``.
        lr, weight_decay: Adam.
    """

    def __init__(self, image_size: int = 64, *, latent_dim: int = 64,
                 widths: list[int] | tuple[int, ...] = BERGMANN_WIDTHS,
                 strides: list[int] | tuple[int, ...] = BERGMANN_STRIDES,
                 batch_norm: bool = False, beta: float = 1.0, likelihood: Likelihood = "gaussian",
                 sigma: float = 0.1, map_error: ReconstructionLoss = "l2", map_sigma: float = 2.0,
                 score_reduction: MapReduction = "max", ssim_window: int = 11,
                 lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        check_choice("map_error", map_error, LOSSES)
        check_choice("score_reduction", score_reduction, MAP_REDUCTIONS)
        self.image_size, self.map_error, self.ssim_window = image_size, map_error, ssim_window
        self.map_sigma, self.score_reduction = map_sigma, score_reduction
        self.set_normalization("none")  # sigmoid decoder: the model works in [0, 1]
        self.vae = VAE(image_size, latent_dim=latent_dim, widths=widths, strides=strides,
                       batch_norm=batch_norm, beta=beta, likelihood=likelihood, sigma=sigma,
                       lr=lr, weight_decay=weight_decay)

    def training_step(self, batch) -> dict[str, Tensor]:
        return self.vae.training_step({"image": self.normalize_input(batch["image"])})

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        """The VAE's deterministic validation loss (z = mu, see :meth:`VAE.validation_step`)."""
        return self.vae.validation_step({"image": self.normalize_input(batch["image"])})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.vae.configure_optimizers()

    def error_map(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, 1, S, S) raw error of the posterior-mean decode."""
        return reconstruction_error_map(x, self.vae.reconstruct(x), self.map_error,
                                        ssim_window=self.ssim_window)

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S)."""
        amap = gaussian_blur(self.error_map(self.normalize_input(images)), self.map_sigma)
        return AnomalyOutput(reduce_map(amap, self.score_reduction), amap)
