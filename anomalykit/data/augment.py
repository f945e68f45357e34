"""``anomalykit data augment``: defective images with masks, and texture variations, made from
good images by the suite's image-to-image GANs.

Three generators, chosen by the checkpoint (or by name for SinGAN, which learns from ONE
image and is therefore trained here, once per good image):

- **pix2pix** (:class:`~anomalykit.generative.pix2pix.Pix2Pix`): renders a defect where a mask
  says. Masks (``masks=``): ``"perlin"`` (DRAEM's Perlin-noise shapes), ``"synthetic"`` (the
  shapes of the synthetic set's scratches, cracks, holes, stains, missing parts and
  contamination), or a path: one painted mask file used for every good image, or a folder of
  masks matched by stem (``<stem>.png`` or ``<stem>_mask.png``). The written mask is exactly
  where the image may differ from the good one (pix2pix composites its output inside the mask).
- **StarGAN** (:class:`~anomalykit.generative.stargan.StarGAN`): translates each good image
  into each defect domain it was trained on; the written mask is where the translation
  changed the image (mean absolute RGB change above ``mask_threshold``): StarGAN has no mask
  of its own, so this one is an estimate.
- **SinGAN** (:class:`~anomalykit.generative.singan.SinGAN`, ``model="singan"``): trains one
  SinGAN per good image and writes ``per_image`` random variations of it as new good images.

Output: ``out`` is one category folder in the MVTec AD layout::

    out/train/good/<stem>_singan_<k>.png            (SinGAN)
    out/test/pix2pix/<stem>_<k>.png                 (pix2pix)
    out/test/<domain>/<stem>.png                    (StarGAN: one per defect domain)
    out/ground_truth/<defect>/<name>_mask.png       (0/255, beside each defective image)
    out/augment.json                                (what made them: model, seed, options, counts)

so ``--root <parent of out> --category <name of out>`` reads it. Every file is written
atomically; ``out`` must be empty or absent unless ``overwrite``. Same seed, same images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalykit.atomic import sha256_file
from anomalykit.errors import ConfigError, DataError

MASK_KINDS = ("perlin", "synthetic")
# SinGAN's paper settings (2000 steps per scale, width 32 -> 128) take over half an hour per
# 64-px image on a CPU; these quick ones take about 15 minutes on one busy core
# (benchmarks/results/singan: 300 steps per scale, width 16 -> 32, 926 s under load). Any key
# of singan_options replaces its default.
SINGAN_DEFAULTS: dict[str, Any] = {"steps_per_scale": 300, "width": 16, "max_width": 32}
RENDERERS = ("pix2pix", "stargan")


@dataclass
class AugmentResult:
    """What :func:`augment` wrote: counts per folder (relative to ``out``) and the manifest."""

    out: Path
    model: str
    counts: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# -- inputs -----------------------------------------------------------------------------------


def good_images(good: str | os.PathLike[str]) -> list[Path]:
    """One image file, or the image files of a folder (not recursive), sorted; a DataError
    naming the path when there are none."""
    from anomalykit.data.io import is_image_file

    path = Path(good)
    if path.is_file():
        if not is_image_file(path):
            raise DataError(f"{path} is not an image file")
        return [path]
    if not path.is_dir():
        raise DataError(f"good images: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"good images: {path} holds no image files")
    return files


def load_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: the file, resized (area when shrinking)."""
    from anomalykit.data.io import read_image

    image = read_image(path)
    if image.shape[:2] != (size, size):
        shrink = min(image.shape[:2]) > size
        image = cv2.resize(image, (size, size),
                           interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image


def _painted_mask(masks: Path, stem: str, size: int) -> np.ndarray:
    from anomalykit.data.io import read_mask

    if masks.is_file():
        path = masks
    else:
        candidates = [masks / f"{stem}{suffix}" for suffix in ("_mask.png", ".png")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"no mask for {stem} in {masks} (looked for {stem}_mask.png and "
                            f"{stem}.png)")
    mask = read_mask(path)
    if mask.shape != (size, size):
        mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    mask = (mask > 0).astype(np.float32)
    if not mask.any():
        raise DataError(f"mask {path} is empty: paint the defect region in white (> 0)")
    return mask


def draw_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size) float32 {0, 1} defect mask of ``kind`` ("perlin" or "synthetic"), never
    empty."""
    if kind == "perlin":
        from anomalykit.data.anomaly_synthesis import perlin_mask

        for _ in range(100):  # low-frequency noise can miss the threshold: draw again
            mask = perlin_mask(size, rng)
            if mask.sum() >= 0.002 * size * size:
                return mask
        raise RuntimeError("could not draw a non-empty Perlin mask")  # unreachable in practice
    if kind == "synthetic":
        from anomalykit.data.synthetic import SYNTHETIC_CATEGORIES, render_sample

        category = SYNTHETIC_CATEGORIES[int(rng.integers(len(SYNTHETIC_CATEGORIES)))]
        _, _, mask = render_sample(category, seed=int(rng.integers(2**31)), split="test_defect",
                                   index=int(rng.integers(1000)), image_size=size)
        return mask.astype(np.float32)
    raise ConfigError(f"masks must be one of {', '.join(MASK_KINDS)} or a mask file / folder; "
                      f"got {kind!r}")


# -- output -----------------------------------------------------------------------------------


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--out {out} is not empty; choose a new folder (or overwrite=True / "
                        f"--overwrite to add to it, replacing files of the same names)")
    out.mkdir(parents=True, exist_ok=True)


def _to_uint8(image) -> np.ndarray:
    """(3, H, W) torch in [0, 1] -> (H, W, 3) uint8."""
    array = image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    return np.round(array * 255.0).astype(np.uint8)


def _write_defect(out: Path, defect: str, name: str, image: np.ndarray, mask: np.ndarray,
                  counts: dict[str, int]) -> None:
    from anomalykit.data.io import write_png

    write_png(out / "test" / defect / f"{name}.png", image)
    write_png(out / "ground_truth" / defect / f"{name}_mask.png",
              (mask > 0).astype(np.uint8) * np.uint8(255))
    key = f"test/{defect}"
    counts[key] = counts.get(key, 0) + 1


# -- the generators ---------------------------------------------------------------------------


def _render_pix2pix(model, files: Sequence[Path], out: Path, *, per_image: int, masks: str,
                    size: int, seed: int, counts: dict[str, int], step: Callable[[], None]) -> None:
    import torch

    rng = np.random.default_rng(seed)
    painted = None if masks in MASK_KINDS else Path(masks)
    if painted is not None and not painted.exists():
        raise ConfigError(f"masks must be one of {', '.join(MASK_KINDS)} or an existing mask "
                          f"file / folder; got {masks!r} (no such path)")
    generator = torch.Generator().manual_seed(seed)
    for path in files:
        good = load_image(path, size)
        good_t = torch.from_numpy(good).permute(2, 0, 1).float().div(255.0)
        mask_file = None if painted is None else _painted_mask(painted, path.stem, size)
        for k in range(per_image):
            mask = mask_file if mask_file is not None else draw_mask(masks, size, rng)
            rendered = model.render_defects(good_t[None], torch.from_numpy(mask)[None, None],
                                            generator=generator)[0]
            _write_defect(out, "pix2pix", f"{path.stem}_{k:03d}", _to_uint8(rendered), mask,
                          counts)
        step()


def _render_stargan(model, files: Sequence[Path], out: Path, *, size: int, seed: int,
                    mask_threshold: float, counts: dict[str, int],
                    step: Callable[[], None]) -> None:
    import torch

    names = list(getattr(model, "domain_names", None) or
                 [f"domain_{k}" for k in range(model.num_domains)])
    # Domain 0 is the good images (train_renderer's convention, and StarGAN's domain_names
    # says so when set): every other domain is a defect type to render.
    targets = [k for k, name in enumerate(names) if k != 0 and name != "good"]
    torch.manual_seed(seed)  # StarGAN's G draws nothing; seeded anyway, should that change
    for path in files:
        good = load_image(path, size)
        good_t = torch.from_numpy(good).permute(2, 0, 1).float().div(255.0)[None]
        for domain in targets:
            translated = model.translate(good_t, domain)[0]
            image = _to_uint8(translated)
            change = np.abs(image.astype(np.float32) - good.astype(np.float32)).mean(2) / 255.0
            mask = (change > mask_threshold).astype(np.float32)
            _write_defect(out, names[domain], path.stem, image, mask, counts)
        step()


def _singan_variations(files: Sequence[Path], out: Path, *, per_image: int, size: int,
                       seed: int, options: dict[str, Any], counts: dict[str, int],
                       step: Callable[[], None]) -> None:
    import torch

    from anomalykit.data.io import write_png
    from anomalykit.generative.singan import variations

    for i, path in enumerate(files):
        good = load_image(path, size)
        good_t = torch.from_numpy(good).permute(2, 0, 1).float().div(255.0)
        images = variations(good_t, per_image, seed=seed + i, **options)
        for k, image in enumerate(images):
            write_png(out / "train" / "good" / f"{path.stem}_singan_{k:03d}.png", _to_uint8(image))
        counts["train/good"] = counts.get("train/good", 0) + len(images)
        step()


def _training_size(net) -> int:
    """The side a renderer was trained at: StarGAN's ``image_size``; pix2pix is fully
    convolutional and records it only in the training pairs it keeps (64 if it has none)."""
    if getattr(net, "image_size", None):
        return int(net.image_size)
    kept = getattr(net, "example_good_", None)
    return int(kept.shape[-1]) if kept is not None and kept.numel() else 64


def augment(model: str | os.PathLike[str], good: str | os.PathLike[str],
            out: str | os.PathLike[str], *, per_image: int = 4, masks: str = "perlin",
            image_size: int | None = None, seed: int = 0, mask_threshold: float = 0.1,
            singan_options: dict[str, Any] | None = None, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None) -> AugmentResult:
    """Write generated images for the good images ``good`` into ``out`` (see the module doc).

    Args:
        model: a pix2pix or StarGAN checkpoint (``Estimator.save``), or ``"singan"``.
        good: one good image or a folder of them.
        out: the category folder to write.
        per_image: renderings per good image (pix2pix: each with a new mask; SinGAN:
            variations; StarGAN: one per defect domain, whatever this says).
        masks: "perlin", "synthetic" or a painted mask file / folder (pix2pix only).
        image_size: side the good images are resized to (default: the model's training size;
            SinGAN: 64).
        seed: masks, noise and SinGAN training; same seed, same images.
        mask_threshold: StarGAN's changed-pixel threshold (mean |RGB change| in [0, 1]).
        singan_options: passed to :func:`anomalykit.generative.singan.variations`, over
            :data:`SINGAN_DEFAULTS`.
        overwrite: allow a non-empty ``out``.
        progress: ``progress(done, total)`` after each good image's renderings.
    """
    if per_image < 1:
        raise ConfigError(f"per_image must be >= 1; got {per_image}")
    if not 0.0 < mask_threshold < 1.0:
        raise ConfigError(f"mask_threshold must be in (0, 1); got {mask_threshold}")
    files = good_images(good)
    out = Path(out)
    done = [0]

    def step() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(files))

    counts: dict[str, int] = {}
    record: dict[str, Any] = {"good": str(good), "images": len(files), "per_image": per_image,
                              "seed": seed}
    if str(model) == "singan":
        size = int(image_size or 64)
        options = {**SINGAN_DEFAULTS, **(singan_options or {})}
        _prepare_out(out, overwrite)
        _singan_variations(files, out, per_image=per_image, size=size, seed=seed,
                           options=options, counts=counts, step=step)
        kind = "singan"
        record["singan_options"] = options
    else:
        from anomalykit.base import Estimator

        path = Path(model)
        if not path.is_file():
            raise DataError(f"model checkpoint {path} does not exist (give a pix2pix or StarGAN "
                            f"checkpoint, or 'singan')")
        net = Estimator.load(path).eval()
        kind = getattr(net, "registry_name", None) or type(net).__name__
        if kind not in RENDERERS:
            raise ConfigError(f"{path} holds a {kind!r} model; data augment renders defects with "
                              f"{' or '.join(RENDERERS)} (or trains SinGAN: model 'singan')")
        size = int(image_size or _training_size(net))
        _prepare_out(out, overwrite)
        record.update(checkpoint=str(path), checkpoint_sha256=sha256_file(path))
        if kind == "pix2pix":
            record["masks"] = str(masks)
            _render_pix2pix(net, files, out, per_image=per_image, masks=str(masks), size=size,
                            seed=seed, counts=counts, step=step)
        else:
            record["mask_threshold"] = mask_threshold
            _render_stargan(net, files, out, size=size, seed=seed,
                            mask_threshold=mask_threshold, counts=counts, step=step)
    from anomalykit.atomic import atomic_write_text

    record.update(model=kind, image_size=size, counts=counts)
    manifest = atomic_write_text(out / "augment.json", json.dumps(record, indent=2) + "\n")
    return AugmentResult(out=out, model=kind, counts=counts, manifest=manifest)


# -- training a renderer on the synthetic set -------------------------------------------------


def stargan_domains(category: str, n: int, *, image_size: int, seed: int, start: int = 0
                    ) -> tuple[dict[str, Any], list[str]]:
    """Unpaired StarGAN data from one synthetic category: domain 0 = "good", then one domain per
    defect type of :data:`~anomalykit.data.synthetic.DEFECTS` [category], ``n`` images cycling
    through the domains. Returns ``({"image": (n, 3, S, S) in [0, 1], "domain": (n,) int64},
    names)``."""
    import torch

    from anomalykit.data.synthetic import DEFECTS, SYNTHETIC_CATEGORIES, render_sample

    if category not in SYNTHETIC_CATEGORIES:
        raise ConfigError(f"unknown synthetic category {category!r}; known: "
                          f"{', '.join(SYNTHETIC_CATEGORIES)}")
    names = ["good", *DEFECTS[category]]
    images, domains = [], []
    for k in range(n):
        domain, index = k % len(names), start + k // len(names)
        if domain == 0:
            _, image, _ = render_sample(category, seed=seed, split="train", index=index,
                                        image_size=image_size)
        else:
            _, image, _ = render_sample(category, seed=seed, split="test_defect", index=index,
                                        image_size=image_size, defect=names[domain])
        images.append(image)
        domains.append(domain)
    tensor = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    return {"image": tensor, "domain": torch.tensor(domains, dtype=torch.long)}, names


def train_renderer(kind: str, out: str | os.PathLike[str], *, categories: Sequence[str] | None = None,
                   image_size: int = 64, n_train: int = 1024, epochs: int = 10, batch_size: int = 16,
                   seed: int = 0, model_options: dict[str, Any] | None = None,
                   device: str = "auto", progress: bool = True) -> Path:
    """Train a defect renderer on the synthetic set and save it to ``out`` (a checkpoint for
    :func:`augment`).

    pix2pix learns (good image, mask) -> defective image from ``n_train`` triples of
    :func:`~anomalykit.data.synthetic.defect_triples` over ``categories`` (default all six).
    StarGAN learns good <-> each defect type of ONE category (``categories`` = [that one]) from
    :func:`stargan_domains`; its domain names are stored in the checkpoint.
    """
    import torch

    from anomalykit.registry import create

    if kind not in RENDERERS:
        raise ConfigError(f"renderer must be one of {', '.join(RENDERERS)}; got {kind!r}")
    if n_train < 1 or epochs < 1 or batch_size < 1:
        raise ConfigError(f"n_train, epochs and batch_size must be >= 1; got {n_train}, {epochs}, "
                          f"{batch_size}")
    options = dict(model_options or {})
    torch.manual_seed(seed)
    if kind == "pix2pix":
        from anomalykit.data.synthetic import defect_triples

        data = defect_triples(categories, n_train, image_size=image_size, seed=seed)
        model = create("pix2pix", "generative", **options)
    else:
        chosen = list(categories or ["brick"])
        if len(chosen) != 1:
            raise ConfigError(f"stargan learns the defect types of ONE category; got {chosen}")
        data, names = stargan_domains(chosen[0], n_train, image_size=image_size, seed=seed)
        model = create("stargan", "generative", image_size=image_size, num_domains=len(names),
                       domain_names=names, **options)
    model.fit(data, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
              progress=progress)
    out = Path(out)
    model.cpu().save(out)
    return out
