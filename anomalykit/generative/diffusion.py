"""Denoising diffusion: DDPM (Ho et al. 2020), DDIM sampling and inversion (Song et al. 2021),
classifier-free guidance (Ho & Salimans 2022) and latent diffusion (Rombach et al. 2022).

Schedules do the math, networks predict (as in diffusers): :class:`NoiseSchedule` holds the
betas and every closed form; :class:`~anomalykit.nn.unet.DiffusionUNet` maps (x_t, t) to a
prediction and never sees a beta.

Notation (Ho et al. 2020): alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s, with 0-based
t in [0, T) and abar_{-1} = 1 (the clean image).

* forward process (eq. 4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps;
* posterior (eqs. 6-7): q(x_{t-1} | x_t, x_0) = N(mu~, beta~ I) with
  mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
  beta~ = (1 - abar_{t-1}) / (1 - abar_t) beta_t;
* predictions: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); the v target (Salimans & Ho
  2022) v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, so x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v;
* DDIM (Song et al. eq. 12): x_{t'} = sqrt(abar_{t'}) x_0 + sqrt(1 - abar_{t'} - sigma^2) eps +
  sigma z, sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}); eta = 1
  with t' = t - 1 is the DDPM posterior, eta = 0 is deterministic. With eta = 0 the same map
  run towards a larger t' is DDIM inversion (the eps of the current point stands in for the
  eps at the target point).

Schedules: "linear" (Ho et al.: beta from 1e-4 to 0.02 over T = 1000) and "cosine" (Nichol &
Dhariwal 2021: abar(t) = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), s = 0.008,
beta_t = min(1 - abar(t + 1) / abar(t), 0.999)).

Models. :class:`DDPM` (``ddpm``): epsilon or v prediction, the simple loss (MSE between the
prediction and its target, t uniform in [0, T)), ancestral sampling with every step, DDIM
sampling with fewer steps, inversion and reconstruction (invert a clean image to step t, then
sample back deterministically), optional classes with label dropout for classifier-free
guidance, and an exponential moving average of the weights (:mod:`anomalykit.nn.ema`,
updated in the loop's ``on_after_optimizer_step``) that sampling, inversion and reconstruction
use. :class:`LatentDiffusion` (``latent_diffusion``): the same DDPM on the latents of a frozen
suite VAE (posterior means, as (latent_dim, 1, 1) "images": the one-level U-Net is then a
residual MLP) or VQ-VAE (pre-quantisation encoder outputs (code_dim, h, w), decoded after
snapping to the nearest codes), scaled to unit standard deviation on the training set.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import GenerativeModel, check_choice
from anomalykit.errors import ConfigError
from anomalykit.generative.ae import randn_like
from anomalykit.nn.ema import ExponentialMovingAverage
from anomalykit.nn.unet import DiffusionUNet
from anomalykit.registry import create, register_generative

ScheduleKind = Literal["linear", "cosine"]
SCHEDULES = ("linear", "cosine")
Prediction = Literal["epsilon", "v"]
PREDICTIONS = ("epsilon", "v")
Variance = Literal["fixed_small", "fixed_large"]
VARIANCES = ("fixed_small", "fixed_large")
Sampler = Literal["ddpm", "ddim"]
SAMPLERS = ("ddpm", "ddim")
LATENT_AUTOENCODERS = ("vae", "vqvae")


# -- helpers -------------------------------------------------------------------------------------


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """(T,) float64 betas evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020)."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """(T,) float64 betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), clipped."""
    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    steps = np.arange(timesteps + 1, dtype=np.float64)
    alpha_bar = f(steps) / f(np.zeros(1))
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def spaced_timesteps(steps: int, t_end: int) -> list[int]:
    """``steps`` increasing timesteps from 0 to ``t_end`` (inclusive), evenly spaced, distinct.

    The DDIM sub-sequence tau_1 < ... < tau_S (Song et al. sec. 4.2): sampling visits it from
    tau_S down and ends at abar_{-1} = 1; inversion climbs it from the clean image.
    """
    if not 1 <= steps <= t_end + 1:
        raise ConfigError(f"steps must be in [1, {t_end + 1}] to reach timestep {t_end}; got {steps}")
    if steps == 1:
        return [t_end]
    return [int(round(v)) for v in np.linspace(0, t_end, steps)]


# -- the schedule ----------------------------------------------------------------------------------


class NoiseSchedule(nn.Module):
    """Betas and the closed forms of the Gaussian diffusion (see the module docstring).

    Args:
        kind: "linear" or "cosine".
        timesteps: T.
        beta_start, beta_end: the linear schedule's range.
        cosine_s: the cosine schedule's offset s.
        max_beta: the cosine schedule's clip.

    Buffers (T,), float32, not saved (they follow from the arguments): ``betas``, ``alphas``,
    ``alphas_cumprod``, ``alphas_cumprod_prev``, ``posterior_variance``,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1`` (of x_0), ``posterior_mean_coef2``
    (of x_t). Computed in float64 first: 1 - abar_t near t = 0 loses digits in float32.
    Methods take integer timesteps t (B,) (or a python int) and broadcast over (B, ...).
    """

    def __init__(self, kind: ScheduleKind = "linear", timesteps: int = 1000, *,
                 beta_start: float = 1e-4, beta_end: float = 0.02, cosine_s: float = 0.008,
                 max_beta: float = 0.999) -> None:
        super().__init__()
        check_choice("schedule", kind, SCHEDULES)
        if timesteps < 1:
            raise ConfigError(f"timesteps must be >= 1; got {timesteps}")
        self.kind, self.timesteps = kind, timesteps
        betas = (linear_betas(timesteps, beta_start, beta_end) if kind == "linear"
                 else cosine_betas(timesteps, cosine_s, max_beta))
        if not (betas > 0).all() or not (betas < 1).all():
            raise ConfigError(f"betas must lie in (0, 1); the {kind} schedule gave "
                              f"[{betas.min():.3g}, {betas.max():.3g}]")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas, "alphas": alphas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
            "posterior_variance": posterior_variance,
            # beta~_0 = 0: improved-diffusion's clip takes the log of beta~_1 there instead.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1:2],
                                                               posterior_variance[1:]))
            if timesteps > 1 else np.log(betas),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        for name, values in tables.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)

    # -- lookups ---------------------------------------------------------------------------------
    def _at(self, values: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """values[t] shaped to broadcast over x: (B, 1, ..., 1) (or (1, ...) for an int t)."""
        if isinstance(t, int):
            return values[t].to(x.dtype).reshape([1] * x.dim())
        return values[t].to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))

    def alpha_bar(self, t: Tensor | int, x: Tensor) -> Tensor:
        """abar_t broadcast over x, with abar_{-1} = 1 (t = -1 is the clean image)."""
        if isinstance(t, int):
            value = self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod.new_ones(())
            return value.to(x.dtype).reshape([1] * x.dim())
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return self._at(padded, t + 1, x)

    # -- closed forms ------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps ~ q(x_t | x_0) (eq. 4)."""
        abar = self.alpha_bar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = (self._at(self.posterior_mean_coef1, t, xt) * x0
                + self._at(self.posterior_mean_coef2, t, xt) * xt)
        return (mean, self._at(self.posterior_variance, t, xt),
                self._at(self.posterior_log_variance_clipped, t, xt))

    def predict_x0_from_eps(self, xt: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        abar = self.alpha_bar(t, xt)
        return (xt - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps_from_x0(self, xt: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        abar = self.alpha_bar(t, xt)
        return (xt - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def velocity(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """The v target sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        abar = self.alpha_bar(t, x0)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0

    def predict_x0_from_v(self, xt: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        abar = self.alpha_bar(t, xt)
        return abar.sqrt() * xt - (1.0 - abar).sqrt() * v

    def predict_eps_from_v(self, xt: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        abar = self.alpha_bar(t, xt)
        return abar.sqrt() * v + (1.0 - abar).sqrt() * xt

    # -- steps ---------------------------------------------------------------------------------
    def ddpm_step(self, xt: Tensor, t: Tensor | int, x0: Tensor, noise: Tensor, *,
                  variance: Variance = "fixed_small") -> Tensor:
        """Ancestral step x_t -> x_{t-1} ~ N(mu~(x_0, x_t), sigma_t^2) (Ho et al. Algorithm 2).

        sigma_t^2 = beta~_t ("fixed_small") or beta_t ("fixed_large", with beta~_1 at t = 0 as in
        improved-diffusion); no noise is added at t = 0.
        """
        mean, posterior_var, _ = self.q_posterior(x0, xt, t)
        if variance == "fixed_small":
            var = posterior_var
        else:
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            var = self._at(large, t, xt)
        nonzero = (torch.as_tensor(t, device=xt.device) > 0).to(xt.dtype)
        nonzero = nonzero.reshape(-1, *[1] * (xt.dim() - 1)) if nonzero.dim() else nonzero
        return mean + nonzero * var.sqrt() * noise

    def ddim_sigma(self, t: Tensor | int, t_prev: Tensor | int, x: Tensor, eta: float) -> Tensor:
        """sigma_t(eta) of DDIM (Song et al. eq. 16) for the jump t -> t_prev."""
        abar, abar_prev = self.alpha_bar(t, x), self.alpha_bar(t_prev, x)
        return eta * ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)).clamp_min(0).sqrt()

    def ddim_step(self, xt: Tensor, t: Tensor | int, t_prev: Tensor | int, eps: Tensor, *,
                  x0: Tensor | None = None, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
        """DDIM update x_t -> x_{t_prev} from the predicted eps (and x_0, default from eps).

        x_{t'} = sqrt(abar_{t'}) x_0 + sqrt(1 - abar_{t'} - sigma^2) eps + sigma z; t_prev = -1
        lands on the clean image. eta = 0 is deterministic (``noise`` unused).
        """
        if x0 is None:
            x0 = self.predict_x0_from_eps(xt, t, eps)
        abar_prev = self.alpha_bar(t_prev, xt)
        out = abar_prev.sqrt() * x0
        if eta == 0:
            return out + (1.0 - abar_prev).sqrt() * eps
        sigma = self.ddim_sigma(t, t_prev, xt, eta)
        if noise is None:
            raise ConfigError("ddim_step with eta > 0 needs noise")
        return out + (1.0 - abar_prev - sigma ** 2).clamp_min(0).sqrt() * eps + sigma * noise

    def ddim_inversion_step(self, x: Tensor, t: Tensor | int, t_next: Tensor | int,
                            eps: Tensor) -> Tensor:
        """Deterministic DDIM run forwards: x_t -> x_{t_next} (t_next > t; t = -1 is x_0).

        The same map as :meth:`ddim_step` with eta = 0 (x_0 from the current point, then
        re-noised along the same eps); the caller evaluates eps at (x_t, t_next), the usual
        approximation of the eps at the (unknown) target point.
        """
        x0 = x if (isinstance(t, int) and t < 0) else self.predict_x0_from_eps(x, t, eps)
        abar_next = self.alpha_bar(t_next, x)
        return abar_next.sqrt() * x0 + (1.0 - abar_next).sqrt() * eps


# -- DDPM ----------------------------------------------------------------------------------------


@register_generative("ddpm")
class DDPM(GenerativeModel):
    """Denoising diffusion probabilistic model on (B, C, S, S) images in [0, 1].

    Args:
        image_size: S, divisible by 2 ** (len(widths) - 1).
        in_channels: C.
        widths, blocks_per_level, attention_levels, mid_attention, heads, groups, dropout: the
            :class:`~anomalykit.nn.unet.DiffusionUNet`.
        num_classes: class-conditional when set (batches carry ``"class"`` (B,) int64).
        class_dropout: probability that a training label is replaced by the null class, so one
            network learns the conditional and the unconditional model (classifier-free
            guidance; Ho & Salimans use 0.1-0.2).
        guidance_scale: default weight w of guided sampling, eps = eps_u + w (eps_c - eps_u)
            (diffusers' convention: 1 = plain conditional; Ho & Salimans' w is this minus 1).
        schedule, timesteps, beta_start, beta_end, cosine_s: the :class:`NoiseSchedule`.
        prediction: the network predicts "epsilon" (Ho et al.) or "v" (Salimans & Ho).
        variance: ancestral sampling variance, "fixed_small" (beta~) or "fixed_large" (beta).
        clip_denoised: clip predicted x_0 to the data range [-1, 1] while sampling.
        rescale: map images from [0, 1] to [-1, 1] (False for latents, used as they are).
        sampler, sample_steps: ``sample``'s default: "ddpm" with every step, or "ddim" with
            ``sample_steps`` steps (eta 0).
        ema_decay: decay of the weights' moving average (None = no average; sampling then uses
            the live weights).
        lr, weight_decay: AdamW.
    """

    def __init__(self, image_size: int = 32, *, in_channels: int = 3,
                 widths: list[int] | tuple[int, ...] = (64, 128, 256), blocks_per_level: int = 2,
                 attention_levels: list[int] | tuple[int, ...] = (2,), mid_attention: bool = True,
                 heads: int = 1, groups: int = 32, dropout: float = 0.0,
                 num_classes: int | None = None, class_dropout: float = 0.1,
                 guidance_scale: float = 1.0, schedule: ScheduleKind = "linear",
                 timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 cosine_s: float = 0.008, prediction: Prediction = "epsilon",
                 variance: Variance = "fixed_small", clip_denoised: bool = True,
                 rescale: bool = True, sampler: Sampler = "ddpm", sample_steps: int | None = None,
                 ema_decay: float | None = 0.999, lr: float = 2e-4,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("variance", variance, VARIANCES)
        check_choice("sampler", sampler, SAMPLERS)
        if not 0.0 <= class_dropout < 1.0:
            raise ConfigError(f"class_dropout must be in [0, 1); got {class_dropout}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.class_dropout, self.guidance_scale = class_dropout, guidance_scale
        self.prediction, self.variance = prediction, variance
        self.clip_denoised, self.rescale = clip_denoised, rescale
        self.sampler, self.sample_steps = sampler, sample_steps
        self.lr, self.weight_decay = lr, weight_decay
        self.schedule = NoiseSchedule(schedule, timesteps, beta_start=beta_start, beta_end=beta_end,
                                      cosine_s=cosine_s)
        self.unet = DiffusionUNet(in_channels, in_channels, widths, blocks_per_level=blocks_per_level,
                                  attention_levels=attention_levels, mid_attention=mid_attention,
                                  heads=heads, num_classes=num_classes, groups=groups,
                                  dropout=dropout)
        self.ema = None if ema_decay is None else ExponentialMovingAverage(self.unet, ema_decay)

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    @property
    def network(self) -> nn.Module:
        """What sampling, inversion and reconstruction run: the EMA weights when kept."""
        return self.unet if self.ema is None else self.ema.module

    # -- data range -----------------------------------------------------------------------------
    def to_model_range(self, x: Tensor) -> Tensor:
        return x * 2.0 - 1.0 if self.rescale else x

    def from_model_range(self, x: Tensor) -> Tensor:
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0) if self.rescale else x

    # -- predictions ------------------------------------------------------------------------------
    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None,
                     guidance_scale: float | None = None, network: nn.Module | None = None) -> Tensor:
        """The network's prediction at (x_t, t), guided when labels and a scale != 1 are given.

        Classifier-free guidance runs the conditional and the null-class inputs as one batch.
        """
        network = self.network if network is None else network
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if class_labels is None or self.num_classes is None or w == 1.0:
            return network(x, t, class_labels)
        null = torch.full_like(class_labels, self.num_classes)
        both = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + w * (conditional - unconditional)

    def eps_and_x0(self, x: Tensor, t: Tensor, output: Tensor, *, clip: bool) -> tuple[Tensor, Tensor]:
        """(eps, x_0) implied by the network output; with ``clip`` x_0 is clipped to [-1, 1]
        and eps recomputed from it (improved-diffusion's DDIM does the same)."""
        if self.prediction == "epsilon":
            eps, x0 = output, self.schedule.predict_x0_from_eps(x, t, output)
        else:
            eps, x0 = (self.schedule.predict_eps_from_v(x, t, output),
                       self.schedule.predict_x0_from_v(x, t, output))
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.schedule.predict_eps_from_x0(x, t, x0)
        return eps, x0

    def _timestep(self, x: Tensor, t: int) -> Tensor:
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)

    # -- training ---------------------------------------------------------------------------------
    def diffusion_loss(self, x0: Tensor, class_labels: Tensor | None = None, *,
                       generator: torch.Generator | None = None) -> Tensor:
        """The simple loss (Ho et al. eq. 14): MSE of the prediction against eps (or v), t
        uniform in [0, T); x0 (B, C, S, S) in the model's range."""
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        noise = randn_like(x0, generator)
        xt = self.schedule.q_sample(x0, t, noise)
        if class_labels is not None and self.num_classes is not None and self.class_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator).to(x0.device) < self.class_dropout
            class_labels = torch.where(drop, torch.full_like(class_labels, self.num_classes),
                                       class_labels)
        target = noise if self.prediction == "epsilon" else self.schedule.velocity(x0, t, noise)
        return F.mse_loss(self.unet(xt, t, class_labels), target)

    def _labels(self, batch: dict[str, Any]) -> Tensor | None:
        if self.num_classes is None:
            return None
        labels = batch.get("class")
        if labels is None:
            raise ConfigError(f"{type(self).__name__} has num_classes={self.num_classes}: batches "
                              "need a 'class' entry (B,) of int64 labels")
        return labels.long()

    def training_step(self, batch) -> dict[str, Tensor]:
        return {"loss": self.diffusion_loss(self.to_model_range(batch["image"]), self._labels(batch))}

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        """The training loss with t, noise and label drops from a fixed seed: the same weights
        give the same number every epoch, so epochs compare like with like."""
        generator = torch.Generator().manual_seed(0)
        return {"loss": self.diffusion_loss(self.to_model_range(batch["image"]), self._labels(batch),
                                            generator=generator)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.unet.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_after_optimizer_step(self, step: int) -> None:
        """Loop hook: move the EMA weights towards the freshly updated ones."""
        if self.ema is not None:
            self.ema.update(self.unet, step)

    # -- sampling -------------------------------------------------------------------------------
    def denoise(self, x: Tensor, timesteps: list[int], *, class_labels: Tensor | None = None,
                guidance_scale: float | None = None, eta: float = 0.0,
                generator: torch.Generator | None = None, clip: bool | None = None) -> Tensor:
        """DDIM from x at ``timesteps[-1]`` down ``timesteps`` (increasing) to the clean image.

        x (B, C, S, S) in the model's range -> x_0 estimate, same range. A python loop over a
        fixed list: traced, it unrolls (the diffusion detector exports it).
        """
        clip = self.clip_denoised if clip is None else clip
        for i in reversed(range(len(timesteps))):
            t, t_prev = timesteps[i], (timesteps[i - 1] if i > 0 else -1)
            t_batch = self._timestep(x, t)
            eps, x0 = self.eps_and_x0(x, t_batch, self.model_output(x, t_batch, class_labels,
                                                                     guidance_scale), clip=clip)
            noise = randn_like(x, generator) if eta > 0 and t_prev >= 0 else None
            x = self.schedule.ddim_step(x, t, t_prev, eps, x0=x0, eta=eta if t_prev >= 0 else 0.0,
                                        noise=noise)
        return x

    def ancestral(self, x: Tensor, *, class_labels: Tensor | None = None,
                  guidance_scale: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
        """DDPM sampling (Ho et al. Algorithm 2) from x_{T-1} through every step to x_0."""
        for t in reversed(range(self.timesteps)):
            t_batch = self._timestep(x, t)
            _, x0 = self.eps_and_x0(x, t_batch, self.model_output(x, t_batch, class_labels,
                                                                   guidance_scale),
                                    clip=self.clip_denoised)
            x = self.schedule.ddpm_step(x, t_batch, x0, randn_like(x, generator),
                                        variance=self.variance)
        return x

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               sampler: Sampler | None = None, steps: int | None = None, eta: float | None = None,
               class_labels: Tensor | None = None,
               guidance_scale: float | None = None) -> Tensor:
        """(n, C, S, S) samples (in [0, 1] when ``rescale``), from the EMA weights.

        sampler "ddpm": ancestral with every step (``steps`` None or T); fewer steps run the
        DDIM update with eta = 1 on the spaced sub-sequence (the "respaced" DDPM of Nichol &
        Dhariwal). sampler "ddim": ``steps`` steps, eta = 0 unless given. ``class_labels`` (n,)
        with ``guidance_scale`` for a class-conditional model (None: the null class).
        """
        sampler = self.sampler if sampler is None else sampler
        check_choice("sampler", sampler, SAMPLERS)
        steps = (self.sample_steps or self.timesteps) if steps is None else steps
        if class_labels is not None:
            class_labels = class_labels.to(self.device).long()
        dtype = next(self.unet.parameters()).dtype
        shape = (n, self.in_channels, self.image_size, self.image_size)
        x = torch.randn(shape, generator=generator, dtype=dtype).to(self.device)
        if sampler == "ddpm" and steps == self.timesteps:
            x = self.ancestral(x, class_labels=class_labels, guidance_scale=guidance_scale,
                               generator=generator)
        else:
            eta = (1.0 if sampler == "ddpm" else 0.0) if eta is None else eta
            x = self.denoise(x, spaced_timesteps(steps, self.timesteps - 1),
                             class_labels=class_labels, guidance_scale=guidance_scale, eta=eta,
                             generator=generator)
        return self.from_model_range(x)

    # -- inversion and reconstruction ---------------------------------------------------------------
    def invert_to(self, x0: Tensor, timesteps: list[int], *,
                  class_labels: Tensor | None = None) -> Tensor:
        """Deterministic DDIM inversion of x0 (model range) up ``timesteps`` -> x at the last."""
        x, t_from = x0, -1
        for t in timesteps:
            eps, _ = self.eps_and_x0(x, self._timestep(x, t),
                                     self.model_output(x, self._timestep(x, t), class_labels, 1.0),
                                     clip=False)
            x = self.schedule.ddim_inversion_step(x, t_from, t, eps)
            t_from = t
        return x

    def _check_t(self, t: int | None, steps: int | None) -> tuple[int, int]:
        t = self.timesteps // 4 if t is None else t  # AnoDDPM noises to 250 of 1000
        steps = min(10, t + 1) if steps is None else steps
        if not 0 <= t < self.timesteps:
            raise ConfigError(f"t must be in [0, {self.timesteps}); got {t}")
        return t, steps

    @torch.no_grad()
    def invert(self, x: Tensor, t: int | None = None, steps: int | None = None, *,
               class_labels: Tensor | None = None) -> Tensor:
        """Images (B, C, S, S) in [0, 1] -> their noise x_t at step t (model range), DDIM
        inversion in ``steps`` steps (defaults: t = T / 4, 10 steps)."""
        t, steps = self._check_t(t, steps)
        return self.invert_to(self.to_model_range(x), spaced_timesteps(steps, t),
                              class_labels=class_labels)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, t: int | None = None, steps: int | None = None, *,
                    class_labels: Tensor | None = None) -> Tensor:
        """Invert to step t and sample back with deterministic DDIM: (B, C, S, S) -> same.

        Both directions use the same ``steps`` timesteps and no x_0 clipping; no randomness.
        """
        t, steps = self._check_t(t, steps)
        timesteps = spaced_timesteps(steps, t)
        xt = self.invert_to(self.to_model_range(x), timesteps, class_labels=class_labels)
        # No x_0 clipping on the way back: inversion did not clip either, and a clip would
        # break the symmetry that makes the round trip (close to) exact.
        return self.from_model_range(self.denoise(xt, timesteps, class_labels=class_labels,
                                                  guidance_scale=1.0, clip=False))


# -- latent diffusion ---------------------------------------------------------------------------


@register_generative("latent_diffusion")
class LatentDiffusion(GenerativeModel):
    """DDPM on the latents of a frozen suite autoencoder (Rombach et al. 2022), images in [0, 1].

    Args:
        autoencoder: "vae" or "vqvae", built from the registry with ``autoencoder_kwargs``; its
            weights come from :meth:`from_autoencoder` (a trained model) and are saved with this
            model. It is never trained here.
        autoencoder_kwargs: its constructor arguments.
        diffusion_kwargs: :class:`DDPM`'s (widths, schedule, ema_decay, ...); ``image_size``,
            ``in_channels``, ``rescale`` and ``clip_denoised`` follow from the latents.

    Buffer ``latent_scale_``: 1 / std of the training latents (set by ``setup_fit``), the
    scale factor of Rombach et al. sec. 4.3.2, so the diffusion sees unit-variance latents.
    """

    def __init__(self, autoencoder: str = "vae", *, autoencoder_kwargs: dict | None = None,
                 diffusion_kwargs: dict | None = None) -> None:
        super().__init__()
        check_choice("autoencoder", autoencoder, LATENT_AUTOENCODERS)
        self.kind = autoencoder
        self.autoencoder = create(autoencoder, "generative", **(autoencoder_kwargs or {}))
        self.autoencoder.requires_grad_(False).eval()
        if autoencoder == "vae":
            channels, size = self.autoencoder.latent_dim, 1
        else:
            channels, size = self.autoencoder.quantizer.code_dim, self.autoencoder.grid
        options = {"widths": (64,), "attention_levels": (), **(diffusion_kwargs or {})}
        fixed = {"image_size", "in_channels", "rescale", "clip_denoised"} & set(options)
        if fixed:
            raise ConfigError(f"diffusion_kwargs may not set {sorted(fixed)}: they follow from the latents")
        self.diffusion = DDPM(size, in_channels=channels, rescale=False, clip_denoised=False, **options)
        self.register_buffer("latent_scale_", torch.tensor(1.0))

    @classmethod
    def from_autoencoder(cls, autoencoder: GenerativeModel, **diffusion_kwargs: Any) -> LatentDiffusion:
        """Latent diffusion over a trained ``vae`` / ``vqvae`` (its weights are copied)."""
        model = cls(autoencoder.registry_name, autoencoder_kwargs=dict(autoencoder.config),
                    diffusion_kwargs=diffusion_kwargs)
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.autoencoder.eval()  # frozen: no batch statistics or codebook updates, ever
        return self

    # -- latents ------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> scaled latents (B, c, h, w)."""
        if self.kind == "vae":
            z = self.autoencoder.encode(x)[0][:, :, None, None]
        else:
            z = self.autoencoder.encoder(x)
        return z * self.latent_scale_

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, c, h, w) -> (B, C, S, S) in [0, 1] (VQ-VAE: nearest codes first)."""
        z = z / self.latent_scale_
        if self.kind == "vae":
            return self.autoencoder.decode(z.flatten(1))
        b, d, h, w = z.shape
        indices = self.autoencoder.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d))
        return self.autoencoder.decode(indices.view(b, h, w))

    @torch.no_grad()
    def _latents(self, data, batch_size: int) -> dict[str, Tensor]:
        from anomalykit.training.inference import as_loader

        out: dict[str, list[Tensor]] = {}
        for batch in as_loader(data, batch_size=batch_size):
            for key, value in batch.items():
                if key == "image":
                    value = self.encode(value.to(self.device))
                if isinstance(value, Tensor):
                    out.setdefault(key, []).append(value.detach())
        return {key: torch.cat(values) for key, values in out.items()}

    # -- training -----------------------------------------------------------------------------------
    def setup_fit(self, train_data, val_data, *, batch_size: int, num_workers: int,
                  progress: bool) -> tuple[Any, Any]:
        """Encode the data once with the frozen autoencoder; set ``latent_scale_`` from it."""
        self.latent_scale_.fill_(1.0)
        train = self._latents(train_data, batch_size)
        scale = 1.0 / float(train["image"].std()) if train["image"].numel() > 1 else 1.0
        self.latent_scale_.fill_(scale)
        train["image"] = train["image"] * scale
        val = None if val_data is None else self._latents(val_data, batch_size)
        return train, val

    def training_step(self, batch) -> dict[str, Tensor]:
        return self.diffusion.training_step(batch)

    @torch.no_grad()
    def validation_step(self, batch) -> dict[str, Tensor]:
        return self.diffusion.validation_step(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.diffusion.configure_optimizers()

    def on_after_optimizer_step(self, step: int) -> None:
        self.diffusion.on_after_optimizer_step(step)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, **options: Any) -> Tensor:
        """(n, C, S, S): latents sampled by the DDPM (options as :meth:`DDPM.sample`), decoded."""
        return self.decode(self.diffusion.sample(n, generator=generator, **options))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, t: int | None = None, steps: int | None = None) -> Tensor:
        """Encode, DDIM-invert the latents to step t and back, decode: (B, C, S, S) -> same."""
        return self.decode(self.diffusion.reconstruct(self.encode(x), t, steps))
