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
