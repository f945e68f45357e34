"""Detectors learn: a few seconds of training on an easy synthetic category beat chance clearly.

Quality is measured by benchmarks/; this only checks that training does something real.
"""

from __future__ import annotations

import pytest

from anomalykit.data import EASY_CATEGORY, generate_synthetic
from anomalykit.pipeline import evaluate_detector, train_detector


@pytest.fixture(scope="module")
def easy_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("easy"), categories=[EASY_CATEGORY],
                              image_size=64, n_train=48, n_test_good=12, n_test_defect=20, seed=0)


@pytest.mark.slow
def test_ae_reaches_image_auroc_08_on_easy_category(easy_root, tmp_path):
    result = train_detector("ae", root=easy_root, category=EASY_CATEGORY, config="quick",
                            overrides=["epochs=30"], out_dir=tmp_path, seed=0, progress=False)
    metrics = evaluate_detector(result.detector, result.test_records, progress=False).metrics
    assert metrics["image_auroc"] >= 0.8, metrics
    assert metrics["pixel_auroc"] >= 0.9, metrics
    # the threshold came from held-out good images and flags few good test images
    assert result.meta["calibrated_on"] == "val"
    assert metrics["fpr_good"] <= 0.5, metrics


# Each reconstruction detector on the same easy set: (detector, overrides, image AUROC bound,
# pixel AUROC bound). Bounds sit well under what seed 0 measured, far above chance (0.5).
RECONSTRUCTION_CASES = [
    # closed form; measured 0.996 / 0.998
    ("pca", [], 0.9, 0.9),
    # measured 0.93 / 0.99 with seed 0; seeds 1, 2 gave 0.90, 0.62 (configs/vae/quick.yaml)
    ("vae", ["epochs=30"], 0.75, 0.9),
    # measured 0.983 / 0.981; seed 1 gives 0.875 / 0.977
    ("riad", ["epochs=12"], 0.85, 0.93),
    # half the quick widths, 12 epochs; measured image 0.92 (pixel 0.72); 8 epochs gave 0.80
    ("draem", ["epochs=12", "recon_base=8", "disc_base=8"], 0.75, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, image_bound, pixel_bound", RECONSTRUCTION_CASES,
                         ids=[case[0] for case in RECONSTRUCTION_CASES])
def test_reconstruction_detectors_learn_the_easy_category(easy_root, tmp_path, name, overrides,
                                                          image_bound, pixel_bound):
    result = train_detector(name, root=easy_root, category=EASY_CATEGORY, config="quick",
                            overrides=overrides, out_dir=tmp_path, seed=0, progress=False)
    metrics = evaluate_detector(result.detector, result.test_records, progress=False).metrics
    assert metrics["image_auroc"] >= image_bound, metrics
    if pixel_bound is not None:
        assert metrics["pixel_auroc"] >= pixel_bound, metrics
    assert result.meta["calibrated_on"] == "val"
