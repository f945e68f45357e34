"""DCGAN networks (Radford et al. 2016) shared by the GAN suite and the adversarial detectors.

:class:`DCGANGenerator`: a (B, latent_dim) code -> a 4x4 map by a 4x4 transposed convolution,
then 4x4 stride-2 transposed convolutions doubling the side until S, BatchNorm + ReLU between,
tanh output (images in [-1, 1]). :class:`DCGANEncoder`: the mirror, 4x4 stride-2 convolutions
halving the side down to 4x4 (no normalisation on the first layer, LeakyReLU 0.2), then a 4x4
valid convolution to ``out_dim`` outputs. The same encoder is a discriminator (``out_dim`` 1,
raw logits: the losses in :mod:`anomalykit.nn.adversarial` apply the sigmoid), GANomaly's
encoders (``out_dim`` = latent size) and f-AnoGAN's / BiGAN's encoder; :meth:`DCGANEncoder.features`
gives the penultimate (B, F, 4, 4) map used for feature matching. Widths double per layer from
``width`` (ngf = ndf = 64 in the papers) and are capped at ``max_width``.

Normalisation is an option because WGAN-GP's critic must not use BatchNorm (the gradient
penalty is per sample): ``norm="layer"`` (GroupNorm with one group) or ``"none"`` there.

Plain modules: nothing here imports the toolkit's contracts.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice

Norm = Literal["batch", "layer", "none"]
NORMS = ("batch", "layer", "none")


def dcgan_depth(image_size: int) -> int:
    """Number of stride-2 layers between 4x4 and ``image_size`` (a power of two >= 8)."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ConfigError(f"image_size must be a power of two >= 8 for the DCGAN networks; "
                          f"got {image_size}")
    return image_size.bit_length() - 3  # log2(S / 4)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def init_dcgan_weights(module: nn.Module) -> None:
    """The DCGAN initialisation: convolutions N(0, 0.02), norm scales N(1, 0.02), biases 0.

    Draws from the global RNG: seed before building (the training loop does).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _widths(depth: int, width: int, max_width: int) -> list[int]:
    """Channel widths of the 4x4 ... S/2 maps of the encoder: width, 2 width, ... (capped)."""
    return [min(width * 2 ** i, max_width) for i in range(depth)]


class DCGANGenerator(nn.Module):
    """(B, latent_dim) -> (B, out_channels, S, S); tanh output in [-1, 1] (``output="tanh"``).

    ``output="none"`` returns the raw last layer (e.g. for a model that applies its own
    output function).
    """

    def __init__(self, image_size: int, latent_dim: int = 100, out_channels: int = 3, *,
                 width: int = 64, max_width: int = 512, norm: Norm = "batch",
                 output: Literal["tanh", "none"] = "tanh") -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        check_choice("output", output, ("tanh", "none"))
        depth = dcgan_depth(image_size)
        widths = _widths(depth, width, max_width)[::-1]  # deepest (4x4) first
        self.latent_dim = latent_dim
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=norm == "none"),
            _norm(norm, widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=norm == "none"),
                       _norm(norm, c_out), nn.ReLU(inplace=True)]
        layers.append(nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1))
        if output == "tanh":
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class DCGANEncoder(nn.Module):
    """(B, in_channels, S, S) -> (B, out_dim); :meth:`features` is the (B, F, 4, 4) map before
    the last layer (the discriminator's features for feature matching)."""

    def __init__(self, image_size: int, out_dim: int = 1, in_channels: int = 3, *,
                 width: int = 64, max_width: int = 512, norm: Norm = "batch") -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        depth = dcgan_depth(image_size)
        widths = _widths(depth, width, max_width)
        self.out_dim, self.feature_channels = out_dim, widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm == "none"),
                       _norm(norm, c_out), nn.LeakyReLU(0.2, inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(widths[-1], out_dim, 4, 1, 0)
        init_dcgan_weights(self)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, feature_channels, 4, 4)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)).flatten(1)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) -> (output (B, out_dim), features (B, F, 4, 4)) in one pass."""
        features = self.body(x)
        return self.head(features).flatten(1), features


def mlp(in_dim: int, out_dim: int, hidden: int = 128, layers: int = 2, *,
        activation: Literal["relu", "leaky_relu"] = "relu") -> nn.Sequential:
    """(B, in_dim) -> (B, out_dim): ``layers`` hidden layers of ``hidden`` units, linear output.

    The networks of the original GAN on 2-D toy data.
    """
    check_choice("activation", activation, ("relu", "leaky_relu"))
    act = (lambda: nn.ReLU(inplace=True)) if activation == "relu" else \
        (lambda: nn.LeakyReLU(0.2, inplace=True))
    dims = [in_dim] + [hidden] * layers
    modules: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        modules += [nn.Linear(a, b), act()]
    modules.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*modules)


def to_tanh_range(images: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the range of the generator's tanh output."""
    return images * 2.0 - 1.0


def from_tanh_range(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)

