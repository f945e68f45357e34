"""GANs that learn an inverse map: InfoGAN (codes from images) and BiGAN / ALI (latents from images).

- ``infogan`` (Chen et al. 2016): the generator's input is noise z plus a categorical code
  (``num_categories`` values, one-hot) and ``continuous_dim`` continuous codes ~ U(-1, 1); an
  auxiliary head Q on the discriminator's features estimates the codes from a sample, and both
  players add ``info_weight`` x (cross-entropy on the categorical code + ``continuous_weight``
  x squared error on the continuous ones: a Gaussian of fixed unit variance, constants dropped)
  to their losses: the variational lower bound on the mutual information I(c; G(z, c))
  (Chen eq. 5). The categorical code then tends to pick out a discrete factor of the data
  without labels; :meth:`InfoGAN.infer_codes` reads the codes of any image.
- ``bigan`` (Donahue et al. 2017; Dumoulin et al. 2017, ALI): an encoder E (the DCGAN encoder
  with ``latent_dim`` outputs) is trained jointly with G; the discriminator sees pairs, real
  (x, E(x)) against fake (G(z), z), through DCGAN features of x concatenated with an MLP
  embedding of z. At the optimum E inverts G: :meth:`BiGAN.encode`, :meth:`BiGAN.reconstruct`.

Both use the losses, options, monitor and sample grid of :mod:`anomalykit.generative.gan`;
their steps are written here because the unconditional ``adversarial_step`` has no room for the
codes (InfoGAN) or the encoder's side of the game (BiGAN).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.errors import ConfigError
from anomalykit.generative.gan import (
    AdversarialModel,
    OptimizerName,
    _store_adversarial,
    check_adversarial_options,
    normal_codes,
)
from anomalykit.nn.adversarial import (
    AdversarialLoss,
    add_gradient_penalty,
    clip_weights,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from anomalykit.nn.dcgan import (
    DCGANEncoder,
    DCGANGenerator,
    Norm,
    from_tanh_range,
    init_dcgan_weights,
    mlp,
    to_tanh_range,
)
from anomalykit.registry import register_generative
from anomalykit.training.inference import evaluating


def _critic_update(d_loss: Tensor, optimizer: torch.optim.Optimizer, critic: nn.Module,
                   clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    optimizer.step()
    if clip is not None:  # WGAN's Lipschitz constraint on the critic only
        clip_weights(critic, clip)


def _player_update(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@register_generative("infogan")
class InfoGAN(AdversarialModel):
    """InfoGAN on (B, C, S, S) images in [0, 1] with DCGAN networks.

    Args:
        image_size / in_channels / width / d_norm: the DCGAN networks, as in
            :class:`~anomalykit.generative.gan.DCGAN`.
        noise_dim: size of the incompressible noise z (62 on MNIST in the paper).
        num_categories: K, values of the categorical code (10 on MNIST).
        continuous_dim: number of continuous codes ~ U(-1, 1) (2 on MNIST).
        info_weight: lambda, weight of the mutual-information term (1 in the paper for
            discrete codes).
        continuous_weight: weight of the continuous codes' squared error inside that term.
        q_hidden: hidden units of the Q head.
        loss / n_critic / gp_weight / clip / lr / betas / optimizer / sample_seed /
            grid_every: as :class:`~anomalykit.generative.gan.DCGAN`.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, *, noise_dim: int = 62,
                 num_categories: int = 10, continuous_dim: int = 2, info_weight: float = 1.0,
                 continuous_weight: float = 0.1, q_hidden: int = 128, width: int = 64,
                 loss: AdversarialLoss = "non_saturating", n_critic: int = 1,
                 gp_weight: float = 10.0, clip: float | None = None, lr: float = 2e-4,
                 betas: list[float] | tuple[float, float] = (0.5, 0.999),
                 optimizer: OptimizerName = "adam", d_norm: Norm = "batch", sample_seed: int = 0,
                 grid_every: int = 1) -> None:
        super().__init__()
        check_adversarial_options(loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=clip,
                                  lr=lr, betas=betas, optimizer=optimizer, d_norm=d_norm)
        if num_categories < 2 or continuous_dim < 0 or noise_dim < 0:
            raise ConfigError(f"InfoGAN needs num_categories >= 2 and continuous_dim, noise_dim "
                              f">= 0; got {num_categories}, {continuous_dim}, {noise_dim}")
        if info_weight < 0 or continuous_weight < 0:
            raise ConfigError(f"info_weight and continuous_weight must be >= 0; got "
                              f"{info_weight}, {continuous_weight}")
        _store_adversarial(self, loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=clip,
                           lr=lr, betas=betas, optimizer=optimizer, sample_seed=sample_seed,
                           grid_every=grid_every)
        self.image_size, self.in_channels = image_size, in_channels
        self.noise_dim, self.num_categories, self.continuous_dim = (noise_dim, num_categories,
                                                                    continuous_dim)
        self.info_weight, self.continuous_weight = info_weight, continuous_weight
        self.latent_dim = noise_dim + num_categories + continuous_dim
        self.generator = DCGANGenerator(image_size, self.latent_dim, in_channels, width=width)
        self.discriminator = DCGANEncoder(image_size, 1, in_channels, width=width, norm=d_norm)
        features = self.discriminator.feature_channels * 16  # the (F, 4, 4) map, flattened
        self.q_head = mlp(features, num_categories + continuous_dim, q_hidden, 1,
                          activation="leaky_relu")
        init_dcgan_weights(self.q_head)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        # Q shares D's body; its head learns with D (Chen sec. 5: "Q and D share all layers").
        return list(self.discriminator.parameters()) + list(self.q_head.parameters())

    # -- codes ---------------------------------------------------------------------------------
    def draw_codes(self, n: int, like: Tensor, generator: torch.Generator | None = None,
                   ) -> tuple[Tensor, Tensor]:
        """(categorical (n,) int64 uniform over K, continuous (n, continuous_dim) ~ U(-1, 1))."""
        categorical = torch.randint(self.num_categories, (n,), generator=generator)
        continuous = torch.rand(n, self.continuous_dim, generator=generator, dtype=like.dtype)
        return categorical.to(like.device), (continuous * 2.0 - 1.0).to(like.device)

    def latent(self, z: Tensor, categorical: Tensor, continuous: Tensor) -> Tensor:
        """(n, latent_dim) = [z, one_hot(categorical), continuous]."""
        return torch.cat([z, F.one_hot(categorical, self.num_categories).to(z.dtype), continuous],
                         dim=1)

    def q(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """D's (B, F, 4, 4) features -> (categorical logits (B, K), continuous means (B, c))."""
        out = self.q_head(features.flatten(1))
        return out[:, :self.num_categories], out[:, self.num_categories:]

    def info_loss(self, features: Tensor, categorical: Tensor, continuous: Tensor) -> Tensor:
        """The negated mutual-information bound (up to constants), before ``info_weight``."""
        logits, means = self.q(features)
        loss = F.cross_entropy(logits, categorical)
        if self.continuous_dim:
            loss = loss + self.continuous_weight * (means - continuous).pow(2).sum(1).mean()
        return loss

    @torch.no_grad()
    def infer_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, S, S) in [0, 1] -> (categorical probabilities (B, K), continuous
        means (B, continuous_dim)) as Q reads them."""
        with evaluating(self):
            logits, means = self.q(self.discriminator.features(to_tanh_range(x)))
        return logits.softmax(1), means

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               codes: Tensor | tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """(n, C, S, S) images in [0, 1].

        codes: None (both codes drawn from ``generator``), a categorical code (n,) int64, or
        a pair (categorical (n,) int64, continuous (n, continuous_dim) or None); what is
        not given is drawn.
        """
        like = next(self.parameters())
        z = normal_codes(n, self.noise_dim, like, generator)
        categorical, continuous = self.draw_codes(n, like, generator)
        if codes is not None:
            given_cat, given_cont = codes if isinstance(codes, (tuple, list)) else (codes, None)
            if given_cat is not None:
                if given_cat.shape != (n,):
                    raise ConfigError(f"categorical codes must have shape ({n},); got "
                                      f"{tuple(given_cat.shape)}")
                categorical = given_cat.long().to(like.device)
            if given_cont is not None:
                if given_cont.shape != (n, self.continuous_dim):
                    raise ConfigError(f"continuous codes must have shape ({n}, "
                                      f"{self.continuous_dim}); got {tuple(given_cont.shape)}")
                continuous = given_cont.to(like)
        with evaluating(self):
            return from_tanh_range(self.generator(self.latent(z, categorical, continuous)))

    def sample_grid(self, per_code: int = 8) -> np.ndarray:
        """(H, W, 3) uint8 grid from the fixed noise, one column per categorical value (at most
        16), ``per_code`` rows."""
        from anomalykit.data.io import image_grid

        k = min(self.num_categories, 16)
        codes = torch.arange(k * per_code) % k
        generator = torch.Generator().manual_seed(self.sample_seed)
        return image_grid(self.sample(len(codes), generator=generator, codes=codes), nrow=k)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) -D(x) for images in [0, 1]: higher = less like the training images."""
        with evaluating(self):
            return -self.discriminator(to_tanh_range(x)).reshape(-1)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """D (+ Q) every step, G every ``n_critic``-th; both add the information term."""
        opt_g, opt_d = optimizers
        real = to_tanh_range(batch["image"])
        categorical, continuous = self.draw_codes(len(real), real)
        z = normal_codes(len(real), self.noise_dim, real, None)
        fake = self.generator(self.latent(z, categorical, continuous))
        d_real = self.discriminator(real)
        d_fake, fake_features = self.discriminator.forward_with_features(fake.detach())
        adversarial, _ = add_gradient_penalty(discriminator_loss(d_real, d_fake, self.loss),
                                              loss=self.loss, critic=self.discriminator, real=real,
                                              fake=fake, gp_weight=self.gp_weight)
        info = self.info_loss(fake_features, categorical, continuous)
        d_loss = adversarial + self.info_weight * info
        _critic_update(d_loss, opt_d, self.discriminator, self.clip)
        if self.global_step % self.n_critic == 0:
            out, features = self.discriminator.forward_with_features(fake)
            g_loss = generator_loss(out, self.loss) + self.info_weight * self.info_loss(
                features, categorical, continuous)
            _player_update(g_loss, opt_g)
        else:
            with torch.no_grad():
                g_loss = generator_loss(d_fake, self.loss) + self.info_weight * info
        self.monitor.update(adversarial.detach(), real, fake.detach())
        return {"loss": (d_loss + g_loss).detach(), "d_loss": d_loss.detach(),
                "g_loss": g_loss.detach(), "info_loss": info.detach()}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        real = to_tanh_range(batch["image"])
        categorical, continuous = self.draw_codes(len(real), real)
        z = normal_codes(len(real), self.noise_dim, real, None)
        fake = self.generator(self.latent(z, categorical, continuous))
        d_fake, features = self.discriminator.forward_with_features(fake)
        info = self.info_weight * self.info_loss(features, categorical, continuous)
        d_loss = discriminator_loss(self.discriminator(real), d_fake, self.loss) + info
        g_loss = generator_loss(d_fake, self.loss) + info
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, "info_loss": info}


class JointDiscriminator(nn.Module):
    """BiGAN's D(x, z): DCGAN features of x (B, hidden) and an MLP embedding of z (B, hidden),
    concatenated, then an MLP to one raw output (B, 1). x in [-1, 1]."""

    def __init__(self, image_size: int, in_channels: int, latent_dim: int, *, width: int,
                 hidden: int, norm: Norm) -> None:
        super().__init__()
        self.x_features = DCGANEncoder(image_size, hidden, in_channels, width=width, norm=norm)
        self.z_features = mlp(latent_dim, hidden, hidden, 1, activation="leaky_relu")
        self.joint = mlp(2 * hidden, 1, hidden, 1, activation="leaky_relu")
        init_dcgan_weights(self.z_features)
        init_dcgan_weights(self.joint)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        h = torch.cat([F.leaky_relu(self.x_features(x), 0.2), F.leaky_relu(self.z_features(z), 0.2)],
                      dim=1)
        return self.joint(h)


@register_generative("bigan")
class BiGAN(AdversarialModel):
    """BiGAN / ALI on (B, C, S, S) images in [0, 1] with DCGAN networks.

    Args:
        image_size / in_channels / latent_dim / width / d_norm: the DCGAN networks, as in
            :class:`~anomalykit.generative.gan.DCGAN`; E is a DCGAN encoder with
            ``latent_dim`` outputs.
        joint_hidden: width of D's x and z embeddings and of its joint MLP.
        loss / n_critic / gp_weight / clip / lr / betas / optimizer / sample_seed /
            grid_every: as :class:`~anomalykit.generative.gan.DCGAN`. G and E share the
            generator's optimiser and minimise D's loss with the labels swapped (Donahue
            sec. 3: E plays the generator's game on the real side).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 3, latent_dim: int = 64, *,
                 width: int = 64, joint_hidden: int = 256,
                 loss: AdversarialLoss = "non_saturating", n_critic: int = 1,
                 gp_weight: float = 10.0, clip: float | None = None, lr: float = 2e-4,
                 betas: list[float] | tuple[float, float] = (0.5, 0.999),
                 optimizer: OptimizerName = "adam", d_norm: Norm = "batch", sample_seed: int = 0,
                 grid_every: int = 1) -> None:
        super().__init__()
        check_adversarial_options(loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=clip,
                                  lr=lr, betas=betas, optimizer=optimizer, d_norm=d_norm)
        _store_adversarial(self, loss=loss, n_critic=n_critic, gp_weight=gp_weight, clip=clip,
                           lr=lr, betas=betas, optimizer=optimizer, sample_seed=sample_seed,
                           grid_every=grid_every)
        self.image_size, self.in_channels, self.latent_dim = image_size, in_channels, latent_dim
        self.generator = DCGANGenerator(image_size, latent_dim, in_channels, width=width)
        self.encoder = DCGANEncoder(image_size, latent_dim, in_channels, width=width)
        self.discriminator = JointDiscriminator(image_size, in_channels, latent_dim, width=width,
                                                hidden=joint_hidden, norm=d_norm)

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.encoder.parameters())

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] -> (B, latent_dim) codes E(x)."""
        with evaluating(self):
            return self.encoder(to_tanh_range(x))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> images (B, C, S, S) in [0, 1]."""
        with evaluating(self):
            return from_tanh_range(self.generator(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """G(E(x)), (B, C, S, S) in [0, 1]."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, S, S) images in [0, 1] from z ~ N(0, I) drawn from ``generator``."""
        return self.decode(normal_codes(n, self.latent_dim, next(self.parameters()), generator))

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """(B,) -D(x, E(x)): higher = the pair looks less like the data's."""
        with evaluating(self):
            x = to_tanh_range(x)
            return -self.discriminator(x, self.encoder(x)).reshape(-1)

    def _pair_critic(self, pair: Tensor) -> Tensor:
        """D on a packed (B, C*S*S + latent_dim) pair, for the gradient penalty on (x, z)."""
        x, z = pair[:, :-self.latent_dim], pair[:, -self.latent_dim:]
        return self.discriminator(x.reshape(len(x), self.in_channels, self.image_size,
                                            self.image_size), z)

    def _encoder_generator_loss(self, d_real: Tensor, d_fake: Tensor) -> Tensor:
        # G and E swap the labels of D's loss: fake pairs should look real and real ones fake.
        if self.loss == "minimax":
            return -discriminator_loss(d_real, d_fake, self.loss)
        return discriminator_loss(d_fake, d_real, self.loss)

    def training_step(self, batch: dict[str, Any], optimizers) -> dict[str, Tensor]:
        """D every step; G and E every ``n_critic``-th step."""
        opt_ge, opt_d = optimizers
        real = to_tanh_range(batch["image"])
        z = normal_codes(len(real), self.latent_dim, real, None)
        fake, z_real = self.generator(z), self.encoder(real)
        d_real = self.discriminator(real, z_real.detach())
        d_fake = self.discriminator(fake.detach(), z)
        d_loss = discriminator_loss(d_real, d_fake, self.loss)
        if self.loss == "wgan_gp":
            packed_real = torch.cat([real.flatten(1), z_real.detach()], 1)
            packed_fake = torch.cat([fake.detach().flatten(1), z], 1)
            d_loss = d_loss + self.gp_weight * gradient_penalty(self._pair_critic, packed_real,
                                                                packed_fake)
        _critic_update(d_loss, opt_d, self.discriminator, self.clip)
        if self.global_step % self.n_critic == 0:
            g_loss = self._encoder_generator_loss(self.discriminator(real, z_real),
                                                  self.discriminator(fake, z))
            _player_update(g_loss, opt_ge)
        else:
            with torch.no_grad():
                g_loss = self._encoder_generator_loss(d_real, d_fake)
        self.monitor.update(d_loss.detach(), real, fake.detach())
        return {"loss": (d_loss + g_loss).detach(), "d_loss": d_loss.detach(),
                "g_loss": g_loss.detach()}

    def adversarial_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        real = to_tanh_range(batch["image"])
        z = normal_codes(len(real), self.latent_dim, real, None)
        d_real = self.discriminator(real, self.encoder(real))
        d_fake = self.discriminator(self.generator(z), z)
        d_loss = discriminator_loss(d_real, d_fake, self.loss)
        g_loss = self._encoder_generator_loss(d_real, d_fake)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss}
