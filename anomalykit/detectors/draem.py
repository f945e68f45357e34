"""DRAEM (Zavrtanik, Kristan and Skocaj, ICCV 2021): a discriminatively trained
reconstruction-embedding detector.

Two networks, both :class:`anomalykit.nn.unet.UNet`:

* reconstructive: an encoder-decoder *without* skip connections (widths
  ``recon_base * {1, 2, 4, 8, 8}``, bilinear upsampling, linear output) that learns to
  turn an image with a synthetic anomaly back into the clean image;
* discriminative: a U-Net with skips (widths ``disc_base * {1, 2, 4, 8, 8, 8}``) on the
  6-channel concatenation [image, reconstruction] that predicts 2-channel logits; the
  softmax's channel 1 is the anomaly map.

Training sees good images only: :class:`~anomalykit.data.anomaly_synthesis.AnomalySynthesizer`
pastes a Perlin-shaped, texture-filled anomaly into half of them on the fly (or, with
``anomaly_source="pix2pix"`` / ``"both"``, a trained pix2pix model paints a defect into the same
Perlin region, for all / half of the anomalies), and the loss is
``L2(recon, clean) + (1 - SSIM)(recon, clean) + focal(logits, mask)`` (gamma 2).
Inference: map = softmax channel 1; image score = max of the map average-pooled with a
21x21 window (at 256 px; scaled with the input size by default).

Learning-rate schedule: the paper multiplies the rate by 0.2 at 80 % and 90 % of the
epochs. The toolkit's trainer calls :meth:`DraemDetector.on_train_epoch_start` at each
epoch, which sets the rate from the epoch (resume-safe: no scheduler state to save).

No ImageNet normalisation: the networks see [0, 1] images (anomalib lost points by
normalising).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError, check_choice
from anomalykit.nn.functional import focal_loss, reduce_map, ssim_loss
from anomalykit.nn.unet import UNet
from anomalykit.registry import register_detector

#: Image side at which the paper's 21x21 score window applies.
PAPER_SIZE = 256
PAPER_POOL = 21


def level_widths(base: int, levels: int) -> list[int]:
    """DRAEM's channel progression ``base * (1, 2, 4, 8, 8, ...)`` over ``levels`` blocks."""
    return [base * min(2 ** i, 8) for i in range(levels)]


@register_detector("draem")
class DraemDetector(Detector):
    """DRAEM: reconstructive + discriminative networks trained on synthetic anomalies.

    Args:
        image_size: side S of the input; divisible by ``2 ** (max(levels) - 1)``.
        recon_base, recon_levels: reconstructive widths ``recon_base * {1,2,4,8,8}``
            (128 and 5 in the paper).
        disc_base, disc_levels: discriminative widths ``disc_base * {1,2,4,8,8,8}``
            (64 and 6 in the paper).
        texture_dir: folder of anomaly-source textures (DTD in the paper); ``None`` =
            the offline default (scikit-image photos + procedural textures). Only read
            during training, so a checkpoint loads anywhere.
        anomaly_prob, beta_max: share of synthetic anomalies (0.5) and the opacity range
            ``beta ~ U[0, beta_max)`` (0.8).
        perlin_min_scale, perlin_max_scale, perlin_threshold: the anomaly shapes
            (Perlin scales ``2**[0, 6)``, threshold 0.5).
        focal_gamma: the segmentation loss's focusing parameter (2).
        ssim_window: window of the SSIM loss (11).
        score_pool_size: averaging window of the image score; ``None`` = the paper's 21
            at 256 px scaled to ``image_size`` (odd, >= 1).
        lr: Adam's rate (1e-4); ``lr_milestones``: fractions of the epochs at which it is
            multiplied by ``lr_gamma`` (0.8, 0.9 and 0.2 in the paper).
        anomaly_source: "perlin" (the paper's: the Perlin region filled with an augmented
            texture), "pix2pix" (the same Perlin region, its appearance rendered on the good
            image by the pix2pix model of ``pix2pix_checkpoint``: no beta blending, the
            rendering is pasted in the mask) or "both" (each anomaly drawn from one of the
            two with probability 1/2).
        pix2pix_checkpoint: a trained :class:`~anomalykit.generative.pix2pix.Pix2Pix`'s
            ``.ckpt``, needed by "pix2pix" and "both". Only read during training (the
            renderer is never part of this model's weights), so a checkpoint loads anywhere.
    """

    def __init__(self, image_size: int = 256, *, recon_base: int = 128, recon_levels: int = 5,
                 disc_base: int = 64, disc_levels: int = 6, texture_dir: str | None = None,
                 anomaly_prob: float = 0.5, beta_max: float = 0.8, perlin_min_scale: int = 0,
                 perlin_max_scale: int = 6, perlin_threshold: float = 0.5,
                 focal_gamma: float = 2.0, ssim_window: int = 11,
                 score_pool_size: int | None = None, lr: float = 1e-4,
                 lr_milestones: list[float] | tuple[float, ...] = (0.8, 0.9),
                 lr_gamma: float = 0.2,
                 anomaly_source: Literal["perlin", "pix2pix", "both"] = "perlin",
                 pix2pix_checkpoint: str | None = None) -> None:
        super().__init__()
        from anomalykit.data.anomaly_synthesis import ANOMALY_SOURCES

        check_choice("anomaly_source", anomaly_source, ANOMALY_SOURCES)
        if anomaly_source != "perlin" and not pix2pix_checkpoint:
            raise ConfigError(f"draem: anomaly_source {anomaly_source!r} renders anomalies with a "
                              "trained pix2pix model: set pix2pix_checkpoint to its .ckpt")
        factor = 2 ** (max(recon_levels, disc_levels) - 1)
        if image_size % factor:
            raise ConfigError(f"draem: image_size {image_size} must be divisible by {factor} "
                              f"(2 ** (levels - 1) with recon_levels={recon_levels}, "
                              f"disc_levels={disc_levels})")
        if score_pool_size is None:
            pool = max(1, round(PAPER_POOL * image_size / PAPER_SIZE))
            pool += 1 - pool % 2  # odd, so the pooled map keeps the input size
        else:
            pool = int(score_pool_size)
            if pool < 1 or pool % 2 == 0:
                raise ConfigError(f"score_pool_size must be a positive odd number; got {pool}")
        milestones = tuple(lr_milestones)
        if not all(0.0 < m <= 1.0 for m in milestones) or list(milestones) != sorted(milestones):
            raise ConfigError("lr_milestones must be sorted fractions of the epochs, each in (0, 1]; "
                              f"got {list(milestones)}")
        self.image_size = image_size
        self.score_pool = min(pool, image_size - 1 + image_size % 2)
        self.texture_dir = texture_dir
        self.synthesis_options = {
            "anomaly_prob": anomaly_prob, "beta_max": beta_max, "min_scale": perlin_min_scale,
            "max_scale": perlin_max_scale, "threshold": perlin_threshold,
        }
        self.focal_gamma, self.ssim_window = focal_gamma, ssim_window
        self.lr, self.lr_milestones, self.lr_gamma = lr, milestones, lr_gamma
        self.set_normalization("none")  # DRAEM works on [0, 1] images
        self.reconstructive = UNet(3, 3, level_widths(recon_base, recon_levels), skip=False,
                                   upsample="bilinear", out_activation=None)
        self.discriminative = UNet(6, 2, level_widths(disc_base, disc_levels), skip=True,
                                   upsample="bilinear", out_activation=None)
        self._synthesizer = None  # built on first use (reads texture_dir)
        self.anomaly_source, self.pix2pix_checkpoint = anomaly_source, pix2pix_checkpoint
        # Loaded on first use, kept out of the module tree: not this model's weights.
        self.__dict__["_renderer"] = None

    # -- synthesis ------------------------------------------------------------------------
    @property
    def synthesizer(self):
        if self._synthesizer is None:
            from anomalykit.data.anomaly_synthesis import AnomalySource, AnomalySynthesizer

            self._synthesizer = AnomalySynthesizer(AnomalySource(self.texture_dir),
                                                   **self.synthesis_options)
        return self._synthesizer

    @property
    def renderer(self):
        """The pix2pix model of ``pix2pix_checkpoint`` (eval mode), loaded on first use."""
        if self.__dict__["_renderer"] is None:
            from anomalykit.generative.pix2pix import load_pix2pix

            self.__dict__["_renderer"] = load_pix2pix(self.pix2pix_checkpoint,
                                                      what="draem pix2pix_checkpoint")
        return self.__dict__["_renderer"]

    def synthesize(self, images: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) clean images -> (augmented images, masks (B, 1, S, S)), on ``images``' device."""
        if self.anomaly_source != "perlin":
            return self._synthesize_with_pix2pix(images, rng)
        array = images.detach().to("cpu", torch.float32).numpy()
        outs, masks = [], []
        for image in array:
            out, mask, _ = self.synthesizer(image, rng)
            outs.append(out)
            masks.append(mask)
        augmented = torch.from_numpy(np.stack(outs)).to(images.device, images.dtype)
        return augmented, torch.from_numpy(np.stack(masks)).to(images.device, images.dtype)

    def _synthesize_with_pix2pix(self, images: Tensor, rng: np.random.Generator
                                 ) -> tuple[Tensor, Tensor]:
        """:meth:`synthesize` for "pix2pix" / "both": per image, the source is drawn ("both"),
        then a Perlin region (:meth:`AnomalySynthesizer.anomaly_mask`, clean with probability
        ``1 - anomaly_prob``) for pix2pix, which renders all of the batch's regions in one
        call; its dropout noise is seeded from ``rng``, so the same seed gives the same images."""
        array = images.detach().to("cpu", torch.float32).numpy()
        size = array.shape[2:]
        outs, masks, painted = [], [], []
        for i, image in enumerate(array):
            if self.anomaly_source == "pix2pix" or rng.random() < 0.5:
                mask = self.synthesizer.anomaly_mask(size, rng)
                out = image
                if mask.any():
                    painted.append(i)
            else:
                out, mask, _ = self.synthesizer(image, rng)
            outs.append(out)
            masks.append(mask)
        augmented = torch.from_numpy(np.stack(outs)).to(images.device, images.dtype)
        mask_batch = torch.from_numpy(np.stack(masks)).to(images.device, images.dtype)
        noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
        if painted:
            renderer = self.renderer.to(images.device)
            index = torch.tensor(painted, device=images.device)
            rendered = renderer.render_defects(images[index].detach(), mask_batch[index],
                                               generator=noise)
            augmented[index] = rendered.to(images.dtype)
        return augmented, mask_batch

    # -- training -------------------------------------------------------------------------
    def _losses(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Tensor]:
        clean = self.normalize_input(batch["image"])
        augmented, mask = self.synthesize(clean, rng)
        recon = self.reconstructive(augmented)
        logits = self.discriminative(torch.cat([augmented, recon], dim=1))
        l2 = F.mse_loss(recon, clean)
        ssim = ssim_loss(recon, clean, window_size=self.ssim_window)
        focal = focal_loss(logits, mask, self.focal_gamma)
        return {"loss": l2 + ssim + focal, "l2": l2.detach(), "ssim": ssim.detach(),
                "focal": focal.detach()}

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        # The synthesis seed comes from torch's global generator, which the trainer
        # reseeds every epoch (seed + epoch): same seed, same anomalies.
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return self._losses(batch, np.random.default_rng(seed))

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Training loss on held-out images with a fixed synthesis per batch.

        The seed is a hash of the batch's file paths (0 without paths), and torch's
        global generator is left untouched, so the validation loss of the same weights
        is the same number every epoch and early stopping compares like with like.
        """
        paths = batch.get("path")
        key = "\n".join(paths) if isinstance(paths, (list, tuple)) else ""
        return self._losses(batch, np.random.default_rng(zlib.crc32(key.encode())))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([
            {"params": self.reconstructive.parameters(), "lr": self.lr},
            {"params": self.discriminative.parameters(), "lr": self.lr},
        ])

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The rate of ``epoch`` (0-based) out of ``epochs``: multi-step decay at the milestones."""
        # round, not int: int(0.29 * 100) is 28 (0.29 * 100 = 28.999...).
        drops = sum(epoch >= round(m * epochs) for m in self.lr_milestones)
        return self.lr * self.lr_gamma**drops

    def on_train_epoch_start(self, epoch: int, epochs: int, optimizers) -> None:
        """Trainer hook: set every optimiser's rate for this epoch (MultiStepLR, stateless)."""
        lr = self.lr_at(epoch, epochs)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    # -- inference ------------------------------------------------------------------------
    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S) in [0, 1]."""
        x = self.normalize_input(images)
        recon = self.reconstructive(x)
        logits = self.discriminative(torch.cat([x, recon], dim=1))
        amap = torch.softmax(logits, dim=1)[:, 1:]
        pooled = F.avg_pool2d(amap, self.score_pool, stride=1, padding=self.score_pool // 2)
        return AnomalyOutput(reduce_map(pooled, "max"), amap)

    # -- figures --------------------------------------------------------------------------
    @torch.no_grad()
    def example_figures(self, images: Tensor, out_dir, *, n: int = 8, seed: int = 0) -> list[Path]:
        """Save ``n`` PNGs of synthetic anomalies to look at; returns their paths.

        Each PNG shows, left to right: the clean image, the image with a synthetic
        anomaly, its mask, and this model's anomaly map on it (grey = 0, white = 1).
        Every panel is an anomaly (no clean draws); same ``seed``, same pictures. The anomalies
        come from the model's ``anomaly_source`` (Perlin textures, pix2pix or both).
        """
        import cv2

        from anomalykit.training.inference import evaluating

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        array = images.detach().to("cpu", torch.float32).numpy()

        def rgb(a: np.ndarray) -> np.ndarray:
            a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
            return (np.clip(a.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)

        paths = []
        with evaluating(self):
            for i in range(min(n, len(array))):
                image = array[i]
                if self.anomaly_source == "perlin":
                    for _ in range(20):  # skip the rare empty Perlin mask
                        augmented, mask, has = self.synthesizer(image, rng, force=True)
                        if has:
                            break
                else:  # the configured source, as training draws it, until a region is drawn
                    for _ in range(50):
                        drawn, masks = self.synthesize(images[i:i + 1].to(self.device), rng)
                        if masks.any():
                            break
                    augmented = drawn[0].cpu().float().numpy()
                    mask = masks[0].cpu().float().numpy()
                pred = self(torch.from_numpy(augmented)[None].to(self.device)).anomaly_map
                pred = pred[0].cpu().numpy()

                gap = np.full((image.shape[1], 4, 3), 255, np.uint8)
                row = np.concatenate([rgb(image), gap, rgb(augmented), gap, rgb(mask), gap,
                                      rgb(pred)], 1)
                scale = max(1, 128 // image.shape[1])
                row = cv2.resize(row, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                path = out / f"draem_synthetic_{i:02d}.png"
                cv2.imwrite(str(path), cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
                paths.append(path)
        return paths
