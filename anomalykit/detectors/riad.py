"""RIAD: reconstruction by inpainting (Zavrtanik, Kristan and Skocaj 2021).

A U-Net learns to inpaint hidden regions of good images. The image is cut into
square cells of k x k pixels; the cells are shuffled and dealt into n disjoint
groups, and each group gives one masked copy of the image in which that group
is hidden. The U-Net inpaints every copy, and the reconstruction takes from
each output only the region its input had hidden, so every pixel is predicted
without ever having been seen:

    I_r = sum_i U(I * M_i) * (1 - M_i),   M_i = 1 where cells are visible.

Loss = L2 + MSGMS + SSIM. At test time the reconstruction is made
for every cell size k in {2, 4, 8, 16}; the anomaly map is the sum over k of
the multi-scale gradient magnitude similarity distance (MSGMS) between the
image and its reconstruction, smoothed by a 21 x 21 mean filter; the image
score is its maximum.

Choices where the paper leaves room (all documented at the arguments):

- ``cell_sizes`` are cell sides in pixels, not cells per side: that is how the
  public re-implementations read the paper (``N = image_size // k`` cells per
  side, so k = 2 gives fine 2-pixel cells). At another resolution than 256 px
  the cells keep their pixel size.
- The test masks are fixed: drawn once from ``mask_seed`` at construction and
  kept in a buffer, so the detector is deterministic and exports to ONNX.
- L2 is taken in the network's [-1, 1] space; MSGMS and SSIM on [0, 1]
  intensities, the range their constants (c = 0.0026, SSIM's k1, k2) assume.
- All n x len(cell_sizes) masked copies go through the U-Net in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalykit.base import AnomalyOutput, Detector, check_choice
from anomalykit.errors import ConfigError
from anomalykit.nn.functional import mean_filter, msgms_loss, msgms_map, reduce_map, ssim_loss
from anomalykit.nn.unet import NORMS, UPSAMPLES, UNet
from anomalykit.registry import register_detector

PAPER_CELL_SIZES = (2, 4, 8, 16)
PAPER_WIDTHS = (64, 128, 256, 512, 512)
PAPER_IMAGE_SIZE = 256  # the 21 x 21 map filter is meant for this size


def disjoint_grid_masks(size: int, k: int, n: int,
                        generator: torch.Generator | None = None) -> Tensor:
    """n disjoint cell masks that together cover a size x size image exactly once.

    The image is cut into (size // k)^2 cells of k x k pixels; the cells are put
    in random order (``generator``) and dealt round-robin into n groups, so the
    group sizes differ by at most one. Returns (n, 1, size, size) float with 1
    on the cells of group i (the region that copy i HIDES, i.e. 1 - M_i in the
    paper's notation): the masks sum to 1 at every pixel.
    """
    if k < 1 or n < 1:
        raise ConfigError(f"cell size k and mask count n must be >= 1; got k={k}, n={n}")
    if size % k:
        raise ConfigError(f"cell size {k} does not divide image size {size} "
                          f"({size} / {k} = {size / k:g} cells per side)")
    cells = size // k
    order = torch.randperm(cells * cells, generator=generator)
    group = torch.empty_like(order)
    group[order] = torch.arange(cells * cells) % n
    masks = (group.view(1, cells, cells) == torch.arange(n).view(n, 1, 1)).float()
    return masks.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2).unsqueeze(1)


@register_detector("riad")
class RIADDetector(Detector):
    """Reconstruction-by-inpainting detector.

    Args:
        image_size: side S of the (square) input; divisible by every cell size and
            by ``2 ** (len(widths) - 1)``.
        cell_sizes: cell sides k in pixels (paper: 2, 4, 8, 16). Training draws one
            per batch; the test map sums over all of them.
        n_masks: n, the number of disjoint masks per cell size (paper: 3).
        widths, upsample, norm: the :class:`~anomalykit.nn.unet.UNet`'s (paper:
            64-128-256-512-512, transposed convs, batch norm; tanh output).
        l2_weight, msgms_weight, ssim_weight: loss weights (paper: 1, 1, 1).
        msgms_scales: scales of MSGMS in the loss and the map (paper: 4); the coarsest,
            ``image_size >> (msgms_scales - 1)``, must be at least 2 px.
        ssim_window: SSIM window of the loss (11).
        map_filter_size: mean-filter window of the map; None = 21 at 256 px, scaled
            with ``image_size``; must be odd.
        mask_seed: seed of the fixed test masks.
        lr, weight_decay: Adam (paper: 1e-4, 1e-5).
    """

    def __init__(self, image_size: int = PAPER_IMAGE_SIZE, *,
                 cell_sizes: Sequence[int] = PAPER_CELL_SIZES, n_masks: int = 3,
                 widths: Sequence[int] = PAPER_WIDTHS, upsample: str = "transpose",
                 norm: str = "batch", l2_weight: float = 1.0, msgms_weight: float = 1.0,
                 ssim_weight: float = 1.0, msgms_scales: int = 4, ssim_window: int = 11,
                 map_filter_size: int | None = None, mask_seed: int = 0,
                 lr: float = 1e-4, weight_decay: float = 1e-5) -> None:
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("norm", norm, NORMS)
        cell_sizes = [int(k) for k in cell_sizes]
        if not cell_sizes:
            raise ConfigError("cell_sizes must not be empty")
        bad = [k for k in cell_sizes if k < 1 or image_size % k]
        if bad:
            raise ConfigError(f"every cell size must divide image_size={image_size}; "
                              f"{bad} do not (cell_sizes={cell_sizes})")
        depth = 2 ** (len(widths) - 1)
        if image_size % depth:
            raise ConfigError(f"image_size={image_size} must be divisible by {depth} "
                              f"(2 ** (len(widths) - 1), widths={list(widths)})")
        if n_masks < 1:
            raise ConfigError(f"n_masks must be >= 1; got {n_masks}")
        # msgms pads each scale by 1 with reflect padding, which needs a side >= 2 at the
        # coarsest scale (each scale halves the side, flooring).
        if msgms_scales < 1 or image_size >> (msgms_scales - 1) < 2:
            raise ConfigError(f"msgms_scales={msgms_scales} needs image_size >> (msgms_scales - 1)"
                              f" >= 2 (msgms_scales >= 1); image_size={image_size} is too small")
        if map_filter_size is None:
            map_filter_size = 2 * round((21 * image_size / PAPER_IMAGE_SIZE - 1) / 2) + 1
        elif map_filter_size < 1 or map_filter_size % 2 == 0:
            # An even window would make the mean-filtered map one pixel larger than the input.
            raise ConfigError(f"map_filter_size must be a positive odd number; got {map_filter_size}")
        self.image_size, self.cell_sizes, self.n_masks = image_size, cell_sizes, n_masks
        self.weights = (l2_weight, msgms_weight, ssim_weight)
        self.msgms_scales, self.ssim_window = msgms_scales, ssim_window
        self.map_filter_size = int(map_filter_size)
        self.lr, self.weight_decay = lr, weight_decay
        self.set_normalization("symmetric")  # tanh output: the U-Net works in [-1, 1]
        self.unet = UNet(3, 3, widths, skip=True, upsample=upsample, norm=norm,
                         out_activation="tanh")
        generator = torch.Generator().manual_seed(mask_seed)
        test_masks = torch.stack([disjoint_grid_masks(image_size, k, n_masks, generator)
                                  for k in cell_sizes])
        # (K, n, 1, S, S), 1 = hidden; kept in the checkpoint so a model reloads bit-identical.
        self.register_buffer("test_masks", test_masks)

    # -- the inpainting ----------------------------------------------------------------------
    def inpaint(self, x: Tensor, hidden: Tensor) -> Tensor:
        """Reconstruct x by inpainting, all masks in one network call.

        x: (B, 3, S, S) normalised images; hidden: (K, n, 1, S, S), 1 where masked
        copy i of set K hides the image, each set summing to 1.
        Returns (K, B, 3, S, S): per set, sum_i U(x * (1 - hidden_i)) * hidden_i.
        """
        k, n = hidden.shape[:2]
        hidden = hidden.unsqueeze(2)  # (K, n, 1, 1, S, S)
        masked = x.unsqueeze(0).unsqueeze(0) * (1.0 - hidden)  # (K, n, B, 3, S, S)
        out = self.unet(masked.flatten(0, 2)).unflatten(0, (k, n, -1))
        return (out * hidden).sum(1)

    def to_unit_range(self, x: Tensor) -> Tensor:
        """Normalised images -> [0, 1] intensities (what MSGMS and SSIM assume)."""
        return x * self.input_std + self.input_mean

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch) -> dict[str, Tensor]:
        x = self.normalize_input(batch["image"])
        # One cell size per batch and fresh masks every step (the global RNG is seeded
        # per epoch by the trainer, so runs are reproducible).
        k = self.cell_sizes[int(torch.randint(len(self.cell_sizes), ()).item())]
        hidden = disjoint_grid_masks(self.image_size, k, self.n_masks).to(x)
        return self._losses(x, self.inpaint(x, hidden.unsqueeze(0))[0])

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        """The training loss with the fixed ``test_masks``, averaged over every cell size.

        No random cell size or masks, so the validation loss of the same weights is the
        same number every epoch and early stopping compares like with like.
        """
        x = self.normalize_input(batch["image"])
        recon = self.inpaint(x, self.test_masks)  # (K, B, 3, S, S)
        # Every term is a mean over equal-sized per-cell-size groups, so the loss of the
        # stacked (K * B) batch is the mean of the K cell sizes' losses.
        return self._losses(x.unsqueeze(0).expand_as(recon).flatten(0, 1), recon.flatten(0, 1))

    def _losses(self, x: Tensor, recon: Tensor) -> dict[str, Tensor]:
        """L2 + MSGMS + SSIM (weighted) of recon against x, both (B, 3, S, S) normalised."""
        l2 = F.mse_loss(recon, x)
        recon01, x01 = self.to_unit_range(recon), self.to_unit_range(x)
        gms = msgms_loss(recon01, x01, scales=self.msgms_scales)
        ssim = ssim_loss(recon01, x01, window_size=self.ssim_window)
        w_l2, w_gms, w_ssim = self.weights
        loss = w_l2 * l2 + w_gms * gms + w_ssim * ssim
        return {"loss": loss, "l2": l2.detach(), "msgms": gms.detach(), "ssim": ssim.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.unet.parameters(), lr=self.lr,
                                weight_decay=self.weight_decay)

    # -- inference ---------------------------------------------------------------------------
    def reconstruct(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) in [0, 1] -> (K, B, 3, S, S) reconstructions in [0, 1], one per cell size."""
        return self.to_unit_range(self.inpaint(self.normalize_input(images), self.test_masks))

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S)."""
        recon = self.reconstruct(images)  # (K, B, 3, S, S)
        k = recon.shape[0]
        target = images.unsqueeze(0).expand_as(recon)
        per_k = msgms_map(target.flatten(0, 1), recon.flatten(0, 1), scales=self.msgms_scales)
        amap = mean_filter(per_k.unflatten(0, (k, -1)).sum(0), self.map_filter_size)
        return AnomalyOutput(reduce_map(amap, "max"), amap)
