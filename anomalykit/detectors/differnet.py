"""DifferNet (Rudolph, Wandt & Rosenhahn, WACV 2021): a normalizing flow on pooled CNN features.

A frozen pretrained backbone sees the image at ``n_scales`` resolutions (S, S/2, S/4 by
2^s x 2^s average pooling); each selected feature map is global-average-pooled and the
vectors are concatenated into one descriptor v of dimension D. A flow of ``coupling_blocks``
blocks maps v to z and is trained by maximum likelihood under N(0, I) (paper eq. 6):

    loss = mean( 0.5 * ||z||^2 - log|det dz/dv| ) / D

The image score is mean(z^2) averaged over ``n_transforms`` test-time rotations of the image
(paper sec. 3.3, eq. 7). Training rotates the images at random (paper sec. 4.2).

Differences from the paper, on purpose:

* Backbone: the offline ``tf_efficientnet_lite0`` (AlexNet in the paper), stage
  ``out_indices=[3]`` (stride 16, 112 channels) by default, so D = 3 * 112 = 336.
* Block: [fixed random permutation, affine coupling, reversal, affine coupling], i.e. both
  halves are transformed once per block, as FrEIA's GLOW coupling block that the reference
  code uses; built from :mod:`anomalykit.nn.coupling` (tanh soft clamp, ``clamp`` 3.0).
* Rotations come from one fixed set, k * 360 / ``n_transforms`` degrees, k = 0..T-1, at test
  time AND in training (a random member per image and step), so training and scoring see the
  same distribution. When ``n_transforms`` divides 4 these are exact quarter turns
  (``torch.rot90``: no interpolation, no black corners); otherwise a bilinear ``grid_sample``
  rotation with zero (black) fill, as torchvision's RandomRotation in the reference code.
  Both export to ONNX (GridSample needs opset >= 16).
* Feature cache: the backbone is frozen and the set of rotations is finite, so ``fit`` (the
  :meth:`DifferNetDetector.setup_fit` hook) computes the pooled features of every training
  image under every rotation once, then the loop trains the flow on them (``cache_features``;
  :mod:`anomalykit.training.feature_cache`). On 2 CPU cores this
  is what makes a useful number of epochs affordable (see configs/differnet/quick.yaml). Data
  that augments on the fly (``train.augment: true``) falls back to backbone features per step.

The anomaly map. DifferNet scores the whole image, so its map is a by-product, and
``map_method`` chooses it (:meth:`DifferNetDetector.set_map_method` switches it on a trained
model; every method is computed inside ``forward``, so it is what the ONNX graph, the
benchmarks' pixel metrics and the deployed model return, and PyTorch and ONNX agree to float
error). Each is computed per test-time transform t, rotated back (R_t^-1), combined over t and
Gaussian-smoothed (``map_sigma``).

* ``density`` (default): each cell's own score under the flow. A single position's features
  are far outside what the flow was trained on (whole-image averages: their raw scores reach
  1e16, highest on the image border), so each cell is pasted into the flow's centre
  c = f^-1(0), the pooled features of the most typical good image, at the weight a = 1 / (h w)
  of one cell of the finest map: map(p) = mean(z(c + a (F(p) - c))^2), F(p) the features of
  every scale at p, averaged over t (:meth:`DifferNetDetector.density_maps`): how anomalous a
  good image would be with this one cell in it. To first order it is the squared Mahalanobis
  distance of F(p) from c under the Gaussian the flow puts at its centre, so ANY change the
  flow finds unlikely raises it, whatever its sign. Gradient-free; one flow pass per cell
  (about twice the attribution's onnxruntime time at 192 px). Where it fails: it sees one
  cell at a time, so a defect that is only visible at a larger scale than a cell (magnetic
  tile's "uneven", a quarter of the image) scores low, and the pixel AUROC, which counts
  those large defects' pixels, is lower than the attribution's there.
* ``attribution``: the score's gradient stopped at the backbone features, Grad-CAM style
  (Selvaraju et al. 2017): g = d score / d v by an explicit backward pass through the flow
  (:func:`flow_vjp`: the layers' own ``vjp``, plain tensor ops), map(p) =
  ReLU( sum_t R_t^-1 sum_s <g_ts, F_ts(p)> ) / S^2, F_ts upsampled to S; dividing by S^2
  makes it each pixel's share of the first-order score <g, v>. Where it fails: <g, F(p)> is
  signed, and a defect that LOWERS activations the flow finds unusual gets a negative
  attribution that the ReLU sends to zero, below the background (issue 15 reported pixel
  AUROC 0.20 on a dark rubber texture). The default until issue 15: checkpoints saved before
  ``map_method`` existed load with ``density``; ``set_map_method("attribution")`` gives
  their old map back.
* ``attribution_abs``: the magnitude of the same sum instead of its positive part (the sum is
  rarely negative: it measured the same as ``attribution``).
* ``attribution_centered``: <g, F(p) - mean_p F(p)>, positive part: each pixel's first-order
  contribution relative to the image's own average. Better than ``attribution`` on the
  synthetic data, but still signed: a dark square on a grainy dark texture scored below its
  background (tests/test_differnet.py).

The paper's map, the gradient of the score with respect to the INPUT image, is PyTorch-only:
``torch.autograd.grad`` (and ``torch.func.grad``) inside ``forward`` do not export with the
dynamo exporter (torch 2.14: "fake tensor in the exported program constant's list" /
"'Tensor' object has no attribute 'constant'") and onnxruntime has no autograd, so it is
:meth:`DifferNetDetector.gradient_map`, not a ``map_method``. Measured on the same trained
flows (quick profile; benchmarks/differnet_maps.py, benchmarks/results/differnet_maps/),
pixel AUROC / AUPRO / onnxruntime ms per image at batch 1:

============================  =====================  =====================
map                           synthetic (6, mean)    magnetic_tile
============================  =====================  =====================
``density``                   0.943 / 0.844 / 68     0.693 / 0.645 / 58
``attribution``               0.715 / 0.309 / 32     0.760 / 0.368 / 29
``attribution_abs``           0.715 / 0.309 / 37     0.760 / 0.368 / 31
``attribution_centered``      0.802 / 0.539 / 38     0.733 / 0.460 / 32
input gradient (PyTorch)      0.733 / 0.317 / -      0.632 / 0.349 / -
============================  =====================  =====================

``density`` is the default: the best AUPRO on both, the best pixel AUROC on the synthetic
data, the only map that passes the dark-and-bright-square test by a clear margin; it costs
about twice the attribution's time, and on magnetic_tile its pixel AUROC is 0.07 lower
(the large "uneven" defects, above).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalykit.base import AnomalyOutput, Detector
from anomalykit.errors import ConfigError, check_choice
from anomalykit.nn.backbone import DEFAULT_BACKBONE, Backbone, register_input_normalization
from anomalykit.nn.coupling import AffineCoupling, FlowSequential, Permutation, subnet_fc
from anomalykit.nn.functional import concat_on_grid, gaussian_blur
from anomalykit.registry import register_detector
from anomalykit.training.feature_cache import FeatureCache, augments, cache_features

#: The exported map (``map_method``; module docstring, "The anomaly map").
MapMethod = Literal["density", "attribution", "attribution_abs", "attribution_centered"]
MAP_METHODS = ("density", "attribution", "attribution_abs", "attribution_centered")

# -- helpers ---------------------------------------------------------------------------------


def rotation_angles(n_transforms: int) -> list[float]:
    """The test-time transforms: k * 360 / n degrees, k = 0..n-1 (k = 0 is the identity)."""
    return [360.0 * k / n_transforms for k in range(n_transforms)]


def rotation_theta(angles_deg: list[float]) -> Tensor:
    """(T, 2, 3) ``affine_grid`` matrices rotating an image counter-clockwise by each angle."""
    rad = torch.tensor(angles_deg, dtype=torch.float64) * (math.pi / 180.0)
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    # affine_grid maps output coordinates to input ones: the inverse rotation.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return theta.to(torch.float32)


def flow_vjp(flow: FlowSequential, x: Tensor, grad_z: Tensor) -> Tensor:
    """(dz/dx)^T grad_z through the flow: x, grad_z (B, D) -> (B, D).

    The chain rule over the layers' own vector-Jacobian products
    (:meth:`anomalykit.nn.coupling.Flow.vjp`), plain tensor ops without autograd, so that it
    exports to ONNX inside ``forward``.
    """
    return flow.vjp(x, grad_z)


# -- detector --------------------------------------------------------------------------------


@register_detector("differnet")
class DifferNetDetector(Detector):
    """DifferNet: normalizing flow on multi-scale pooled features of a frozen CNN.

    Args:
        image_size: side S of the input; the scales are S, S/2, ... (2^s average pooling).
        backbone: timm architecture of the frozen feature extractor.
        out_indices: backbone stages whose maps are pooled and concatenated (see
            :class:`~anomalykit.nn.backbone.Backbone`; 3 = stride 16, 4 = stride 32).
        backbone_weights: local weight file, ``"random"`` (tests), or None (offline default).
        n_scales: image scales (3 in the paper).
        coupling_blocks: flow blocks, each [permutation, coupling, reversal, coupling] (8).
        fc_hidden: hidden width of the coupling subnets (None: 2 * D).
        fc_layers: hidden layers per subnet (1 in the reference code).
        dropout: dropout in the subnets.
        clamp: soft clamp of the coupling log-scales (alpha = 3 in the paper).
        n_transforms: test-time rotations T (64 in the paper); see the module docstring.
        train_transforms: random rotations of each image per training step (4 in the code).
        train_rotations: rotate training images (else train on the identity only).
        cache_features: let :meth:`fit` precompute the frozen features once.
        map_method: the exported anomaly map: ``density`` (each cell's score under the flow),
            ``attribution`` (the first-order attribution's positive part, the old map),
            ``attribution_abs``, ``attribution_centered`` (module docstring).
        map_sigma: Gaussian smoothing of the map, in pixels of the input (0 = none).
        lr, weight_decay: Adam (2e-4 in the paper; 1e-5).
    """

    # The checkpoint holds the backbone weights: no weight file is needed to load one.
    checkpoint_load_overrides = {"backbone_weights": "random"}

    def __init__(self, image_size: int = 448, *, backbone: str = DEFAULT_BACKBONE,
                 out_indices: list[int] | tuple[int, ...] = (3,), backbone_weights: str | None = None,
                 n_scales: int = 3, coupling_blocks: int = 8, fc_hidden: int | None = None,
                 fc_layers: int = 1, dropout: float = 0.0, clamp: float = 3.0,
                 n_transforms: int = 64, train_transforms: int = 4, train_rotations: bool = True,
                 cache_features: bool = True, map_method: MapMethod = "density",
                 map_sigma: float = 4.0, lr: float = 2e-4, weight_decay: float = 1e-5) -> None:
        super().__init__()
        check_choice("map_method", map_method, MAP_METHODS)
        if n_scales < 1 or image_size >> (n_scales - 1) < 1:
            raise ConfigError(f"n_scales must be >= 1 and image_size / 2^(n_scales - 1) >= 1; "
                              f"got image_size={image_size}, n_scales={n_scales}")
        if coupling_blocks < 1:
            raise ConfigError(f"coupling_blocks must be >= 1; got {coupling_blocks}")
        if n_transforms < 1 or train_transforms < 1:
            raise ConfigError(f"n_transforms and train_transforms must be >= 1; "
                              f"got {n_transforms}, {train_transforms}")
        self.image_size, self.n_scales, self.n_transforms = image_size, n_scales, n_transforms
        self.train_transforms, self.train_rotations = train_transforms, train_rotations
        self.cache_features, self.map_sigma = cache_features, map_sigma
        self.map_method = map_method
        self.lr, self.weight_decay = lr, weight_decay
        # Building a Backbone draws from the global RNG, and the first one in a process draws more
        # (it also resolves the weights): fork it, so the flow's initialisation depends on the
        # seed only, not on what was built before.
        with torch.random.fork_rng(devices=[]):
            self.backbone = Backbone(backbone, out_indices, weights=backbone_weights)
        register_input_normalization(self, self.backbone)
        self.dim = n_scales * sum(self.backbone.channels)
        if self.dim % 2:
            raise ConfigError(f"the feature dimension {self.dim} must be even (couplings split it)")
        subnet = subnet_fc(fc_hidden or 2 * self.dim, fc_layers, dropout=dropout)
        layers: list[nn.Module] = []
        for i in range(coupling_blocks):
            # The reversal swaps the halves (D even), so each block transforms both of them.
            layers += [Permutation(self.dim, seed=i), AffineCoupling(self.dim, subnet, clamp=clamp),
                       Permutation(self.dim, kind="reverse"),
                       AffineCoupling(self.dim, subnet, clamp=clamp)]
        self.flow = FlowSequential(*layers)
        # Exact quarter turns when every angle is a multiple of 90 degrees.
        self.quarter_turns = 4 % n_transforms == 0
        self.register_buffer("rotation_theta", rotation_theta(rotation_angles(n_transforms)),
                             persistent=False)
        self.register_buffer("inverse_theta",
                             rotation_theta([-a for a in rotation_angles(n_transforms)]),
                             persistent=False)

    # -- transforms ------------------------------------------------------------------------
    def _rotate(self, x: Tensor, k: int | Tensor, *, inverse: bool = False) -> Tensor:
        """Rotate (N, C, S, S) by transform k (an int, or one index per image) or its inverse."""
        if self.quarter_turns:
            step = 4 // self.n_transforms
            if isinstance(k, int):
                return torch.rot90(x, (-1 if inverse else 1) * k * step, dims=(2, 3))
            turns = torch.stack([torch.rot90(x, q * step, dims=(2, 3))
                                 for q in range(self.n_transforms)])
            return turns[k.to(x.device), torch.arange(x.shape[0], device=x.device)]
        theta = self.inverse_theta if inverse else self.rotation_theta
        theta = theta[k].expand(x.shape[0], 2, 3) if isinstance(k, int) else theta[k.to(x.device)]
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def transform_all(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (T * B, 3, S, S), transform-major (rows t * B .. t * B + B - 1)."""
        return torch.cat([self._rotate(images, t) for t in range(self.n_transforms)])

    # -- features and flow -----------------------------------------------------------------
    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """(N, 3, S, S) in [0, 1] -> [(N, C_i, h, w) per scale and stage], scale-major."""
        x = self.normalize_input(images)
        maps: list[Tensor] = []
        for s in range(self.n_scales):
            maps += self.backbone(F.avg_pool2d(x, 2**s) if s else x)
        return maps

    @staticmethod
    def pool(maps: list[Tensor]) -> Tensor:
        """Feature maps -> (N, D) concatenated global averages, the flow's input."""
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)

    def nll(self, features: Tensor) -> Tensor:
        """(N, D) -> scalar mean(0.5 ||z||^2 - log|J|) / D (paper eq. 6)."""
        z, log_det_jacobian = self.flow(features)
        return (0.5 * z.pow(2).sum(1) - log_det_jacobian).mean() / self.dim

    # -- training --------------------------------------------------------------------------
    def _random_transforms(self, n: int) -> Tensor:
        if not self.train_rotations:
            return torch.zeros(n, dtype=torch.long)
        return torch.randint(0, self.n_transforms, (n,))

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if "features" in batch:  # cached by setup_fit: (B, T, D), every transform of each image
            cached = batch["features"]
            rows = torch.arange(len(cached)).repeat_interleave(self.train_transforms)
            features = cached[rows.to(cached.device),
                              self._random_transforms(len(rows)).to(cached.device)]
        else:
            images = batch["image"].repeat(self.train_transforms, 1, 1, 1)
            with torch.no_grad():  # the backbone is frozen: no graph through it
                features = self.pool(self.feature_maps(
                    self._rotate(images, self._random_transforms(len(images)))))
        return {"loss": self.nll(features)}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The loss over every test-time transform of each image: deterministic, unlike training."""
        if "features" in batch:
            features = batch["features"].flatten(0, 1)
        else:
            features = self.pool(self.feature_maps(self.transform_all(batch["image"])))
        return {"loss": self.nll(features)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def transformed_features(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, T, D) pooled features of each image under every transform."""
        features = self.pool(self.feature_maps(self.transform_all(images)))
        return features.view(self.n_transforms, len(images), -1).transpose(0, 1)

    def cache(self, data, *, batch_size: int = 16, num_workers: int = 0,
              progress: bool = False) -> FeatureCache:
        """Pooled features of every image of ``data`` under every transform: items (T, D)."""
        return cache_features(self, data, self.transformed_features, batch_size=batch_size,
                              num_workers=num_workers, progress=progress, desc="differnet features")

    def setup_fit(self, train_data, val_data, *, batch_size: int, num_workers: int,
                  progress: bool) -> tuple[Any, Any]:
        """Loop hook: cached features when ``cache_features`` (module docstring), else the data.

        Data that augments on the fly is not cached (one draw per image would be frozen).
        """
        if not self.cache_features:
            return train_data, val_data
        if augments(train_data):
            warnings.warn("differnet: the training data augments images on the fly, so backbone "
                          "features are computed every step instead of cached (slower)",
                          UserWarning, stacklevel=2)
            return train_data, val_data
        options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
        train = self.cache(train_data, **options)
        return train, None if val_data is None else self.cache(val_data, **options)

    # -- inference -------------------------------------------------------------------------
    def set_map_method(self, map_method: MapMethod) -> None:
        """Switch the map of a trained model (no retraining: score and flow are unchanged).

        Updates ``config`` too, so a checkpoint or export made afterwards records the method.
        ``pixel_threshold_`` belongs to the old map: :meth:`calibrate` again before exporting.
        """
        check_choice("map_method", map_method, MAP_METHODS)
        self.map_method = map_method
        self.config["map_method"] = map_method

    def forward(self, images: Tensor) -> AnomalyOutput:
        """images (B, 3, S, S) in [0, 1] -> score (B,), anomaly_map (B, 1, S, S)."""
        b, t = images.shape[0], self.n_transforms
        maps = self.feature_maps(self.transform_all(images))
        features = self.pool(maps)
        z, _ = self.flow(features)
        score = z.pow(2).mean(1).view(t, b).mean(0)
        if self.map_method == "density":
            heat = self.density_maps(maps)
        else:
            heat = self.attribution_maps(maps, features, z)
        heat = heat.view(t, b, 1, self.image_size, self.image_size)
        amap = self._rotate(heat[0], 0, inverse=True)
        for i in range(1, t):
            amap = amap + self._rotate(heat[i], i, inverse=True)
        if self.map_method == "density":
            amap = amap / t
        elif self.map_method == "attribution_abs":
            amap = amap.abs()
        else:
            amap = amap.clamp_min(0.0)
        return AnomalyOutput(score, gaussian_blur(amap, self.map_sigma))

    def attribution_maps(self, maps: list[Tensor], features: Tensor, z: Tensor) -> Tensor:
        """Signed first-order attribution per transformed image: (T * B, 1, S, S).

        <d score / d v, F(p)> summed over scales (minus the image's own average F for
        ``attribution_centered``), upsampled to S and divided by S^2: each pixel's share of
        the first-order score <d score / d v, v> (module docstring).
        """
        size = self.image_size
        # d score / d features, by an explicit (exportable) backward pass through the flow.
        grad = flow_vjp(self.flow, features, z * (2.0 / (self.dim * self.n_transforms)))
        centered = self.map_method == "attribution_centered"
        heat, offset = 0.0, 0
        for m in maps:
            channels = m.shape[1]
            feature = m - m.mean(dim=(2, 3), keepdim=True) if centered else m
            cam = (feature * grad[:, offset:offset + channels, None, None]).sum(1, keepdim=True)
            heat = heat + F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
            offset += channels
        return heat / (size * size)

    def density_maps(self, maps: list[Tensor]) -> Tensor:
        """Each cell's own score under the flow, per transformed image: (T * B, 1, S, S).

        The flow knows whole-image averages only, so a single position's features are far
        outside what it was trained on (their raw scores reach 1e16 and saturate on the image
        border). Instead, each cell is pasted into the flow's centre c = f^-1(0), the pooled
        features of the most typical good image, at the weight a = 1 / (h w) of one cell of
        the finest map: v(p) = c + a (F(p) - c), F(p) the (D,) features of every scale at p
        (coarser maps upsampled to the finest grid). The map is the score mean(z^2) of v(p):
        how anomalous a good image would be with this one cell in it. To first order
        z = a J (F(p) - c), J the flow's Jacobian at c, so the map is a^2 / D times the squared
        Mahalanobis distance of F(p) from c under the Gaussian the flow puts at its centre: any
        direction away from the good features raises it, whatever the sign of the change.
        """
        cells = concat_on_grid(maps)
        height, width = cells.shape[-2:]
        n = cells.shape[0]
        centre = self.flow.inverse(cells.new_zeros(1, self.dim)).view(1, 1, self.dim)
        pasted = centre + (cells.flatten(2).transpose(1, 2) - centre) / (height * width)
        z, _ = self.flow(pasted.reshape(n * height * width, self.dim))
        heat = z.pow(2).mean(1).view(n, 1, height, width)
        size = self.image_size
        return F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)

    def gradient_map(self, images: Tensor) -> Tensor:
        """The paper's map, PyTorch only: |d score / d image| summed over channels, smoothed.

        images (B, 3, S, S) in [0, 1] -> (B, 1, S, S). Uses autograd, so it is not part of the
        exported graph (module docstring); works under ``torch.no_grad()``.
        """
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            features = self.pool(self.feature_maps(self.transform_all(x)))
            z, _ = self.flow(features)
            score = z.pow(2).mean(1).view(self.n_transforms, len(x)).mean(0)
            (grad,) = torch.autograd.grad(score.sum(), x)
        return gaussian_blur(grad.abs().sum(1, keepdim=True), self.map_sigma)
