"""A one-conv reconstruction detector for tests that need a fast, real, trainable detector.

Not registered here: each test module registers its own subclass under its own name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomalykit.base import AnomalyOutput, Detector


class TinyConvDetector(Detector):
    """One conv layer reconstructing its input; map = squared error, score = ``reduction`` of it."""

    reduction = "max"

    def __init__(self, image_size: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.image_size = image_size
        self.lr = lr
        self.set_normalization("none")
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, images: Tensor) -> AnomalyOutput:
        error = ((self.conv(images) - images) ** 2).mean(1, keepdim=True)
        flat = error.flatten(1)
        return AnomalyOutput(flat.amax(1) if self.reduction == "max" else flat.mean(1), error)

    def training_step(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        return {"loss": ((self.conv(x) - x) ** 2).mean()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
