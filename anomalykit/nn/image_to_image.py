"""Blocks shared by the image-to-image GANs (pix2pix, CycleGAN, StarGAN, VQGAN).

- :class:`PatchDiscriminator`: the PatchGAN of Isola et al. 2017: a fully convolutional
  discriminator that classifies each overlapping patch (70x70 receptive field with the
  default three strided layers), so it judges texture and local structure, and leaves global
  layout to the L1 / cycle losses.
- :class:`ResnetGenerator`: Johnson et al.'s generator used by CycleGAN and StarGAN: a 7x7
  stem, ``downsamples`` stride-2 convs, ``blocks`` residual blocks, the mirror of the
  downsampling and a 7x7 tanh head.
- :class:`ImagePool`: CycleGAN's history of generated images (Shrivastava et al. 2017): the
  discriminator sees a mix of the newest fakes and older ones, which damps oscillation.

Images are in [-1, 1] (the generators end in tanh). Plain modules: nothing here imports the
toolkit's contracts.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice

I2INorm = Literal["instance", "batch", "none"]
I2I_NORMS = ("instance", "batch", "none")


def image_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer of the image-to-image networks: ``instance`` (CycleGAN, StarGAN:
    per-image statistics, so a batch of 1 trains), ``batch`` (pix2pix) or ``none``."""
    check_choice("norm", kind, I2I_NORMS)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """The pix2pix / CycleGAN initialisation: conv weights N(0, std), biases 0, norm scales
    N(1, std)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, in_channels, H, W) -> (B, 1, H', W') raw logits, one per patch.

    Layout (Isola et al. 2017, appendix 6.1.2): C64 (no norm) - C128 - C256 - C512 (stride 1)
    - 1-channel conv, 4x4 kernels, LeakyReLU 0.2; ``layers`` strided convs (3: a 70x70
    receptive field; each fewer halves it). ``width`` is the first layer's channels, doubling
    per layer up to 8 x width. For a 32-px input and ``layers=3``: H' = W' = 2.

    Args:
        in_channels: channels of what it judges (pix2pix: condition + image concatenated).
        width: channels of the first layer (64 in the paper).
        layers: strided conv layers, >= 1.
        norm: "batch" (pix2pix), "instance" (CycleGAN) or "none".
        spectral: wrap every conv in spectral normalisation (Miyato et al. 2018).

    :meth:`features` gives the body's output, for heads of one's own (StarGAN's domain
    classifier).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3, *,
                 norm: I2INorm = "batch", spectral: bool = False) -> None:
        super().__init__()
        check_choice("norm", norm, I2I_NORMS)
        if layers < 1 or width < 1:
            raise ConfigError(f"PatchDiscriminator needs layers >= 1 and width >= 1; got "
                              f"layers {layers}, width {width}")
        wrap = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        blocks: list[nn.Module] = [wrap(nn.Conv2d(in_channels, width, 4, 2, 1)),
                                   nn.LeakyReLU(0.2, inplace=True)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1  # the last feature layer keeps the resolution
            blocks += [wrap(nn.Conv2d(channels, out, 4, stride, 1, bias=norm == "none")),
                       image_norm(norm, out), nn.LeakyReLU(0.2, inplace=True)]
            channels = out
        self.body = nn.Sequential(*blocks)
        self.feature_channels = channels
        self.head = wrap(nn.Conv2d(channels, 1, 4, 1, 1))
        init_normal(self)

    def features(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, feature_channels, H'', W''): the body's output."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ResidualBlock(nn.Module):
    """x + (3x3 conv - norm - ReLU - 3x3 conv - norm)(x), reflection padding; shape kept."""

    def __init__(self, channels: int, norm: I2INorm = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=norm == "none"),
            image_norm(norm, channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=norm == "none"),
            image_norm(norm, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H, W) in [-1, 1].

    c7s1-w, ``downsamples`` x d(2^i w), ``blocks`` x R, the mirrored transposed convs,
    c7s1-out + tanh (Zhu et al. 2017, appendix 7.2; 9 blocks at 256 px, 6 at 128 px). H and W
    must be divisible by ``2 ** downsamples``.

    ``stem_padding``: "reflect" (CycleGAN) or "zeros" (StarGAN's code). Input channels that are
    constant over the image (StarGAN's one-hot target domain) stay constant under reflection
    padding, and the stem's instance norm then removes them entirely; zero padding keeps them
    visible at the borders.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 64, *,
                 blocks: int = 6, downsamples: int = 2, norm: I2INorm = "instance",
                 stem_padding: Literal["reflect", "zeros"] = "reflect") -> None:
        super().__init__()
        check_choice("norm", norm, I2I_NORMS)
        check_choice("stem_padding", stem_padding, ("reflect", "zeros"))
        if width < 1 or blocks < 0 or downsamples < 0:
            raise ConfigError(f"ResnetGenerator needs width >= 1, blocks >= 0, downsamples >= 0;"
                              f" got {width}, {blocks}, {downsamples}")
        self.downsampling = 2 ** downsamples
        pad = nn.ReflectionPad2d(3) if stem_padding == "reflect" else nn.ZeroPad2d(3)
        layers: list[nn.Module] = [pad, nn.Conv2d(in_channels, width, 7, bias=norm == "none"),
                                   image_norm(norm, width), nn.ReLU(inplace=True)]
        channels = width
        for _ in range(downsamples):
            layers += [nn.Conv2d(channels, channels * 2, 3, 2, 1, bias=norm == "none"),
                       image_norm(norm, channels * 2), nn.ReLU(inplace=True)]
            channels *= 2
        layers += [ResidualBlock(channels, norm) for _ in range(blocks)]
        for _ in range(downsamples):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 3, 2, 1, output_padding=1,
                                          bias=norm == "none"),
                       image_norm(norm, channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ConfigError(f"ResnetGenerator needs H and W divisible by {self.downsampling}; "
                              f"got {tuple(x.shape[-2:])}")
        return self.net(x)


class ImagePool:
    """History of generated images (CycleGAN: 50 images).

    ``query(images)`` with (B, C, H, W) fakes returns (B, C, H, W): while the pool fills, the
    new images themselves (and they are stored); once full, each image is, with probability
    1/2, swapped for a random stored one (the new image takes its place), otherwise returned
    as is. Draws use torch's global RNG (the training loop seeds it), so a run reproduces.
    Images are stored detached; ``size`` 0 turns the pool off.
    """

    def __init__(self, size: int = 50) -> None:
        if size < 0:
            raise ConfigError(f"image pool size must be >= 0; got {size}")
        self.size = size
        self.images: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: Tensor) -> Tensor:
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()) < 0.5:
                i = int(torch.randint(len(self.images), ()))
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)
