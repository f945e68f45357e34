"""RIAD invariants: disjoint grid masks, MSGMS, the U-Net, and that RIAD learns.

The registry-wide contracts (shapes, one step, save/load, ONNX parity of the
whole detector) live in test_contracts.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalykit.detectors.riad import RIADDetector, disjoint_grid_masks
from anomalykit.errors import ConfigError
from anomalykit.nn.functional import gms_map, gradient_magnitude, msgms_loss, msgms_map
from anomalykit.nn.unet import UNet


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# -- masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_cover_every_pixel_exactly_once_with_whole_cells(k, seed):
    size, n = 32, 3
    masks = disjoint_grid_masks(size, k, n, torch.Generator().manual_seed(seed))
    assert masks.shape == (n, 1, size, size)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(1, size, size))  # disjoint and covering
    cells = size // k
    # every k x k cell lies wholly inside one mask
    blocks = masks.view(n, cells, k, cells, k)
    assert torch.equal(blocks.amin(dim=(2, 4)), blocks.amax(dim=(2, 4)))
    # round-robin dealing: group sizes differ by at most one cell
    counts = blocks[:, :, 0, :, 0].sum(dim=(1, 2))
    assert int(counts.max() - counts.min()) <= 1
    assert int(counts.sum()) == cells * cells


def test_masks_are_random_but_reproducible():
    a = disjoint_grid_masks(64, 4, 3, torch.Generator().manual_seed(0))
    b = disjoint_grid_masks(64, 4, 3, torch.Generator().manual_seed(0))
    c = disjoint_grid_masks(64, 4, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_masks_reject_cells_that_do_not_divide_the_image():
    with pytest.raises(ConfigError, match="6 does not divide image size 32"):
        disjoint_grid_masks(32, 6, 3)
    with pytest.raises(ConfigError, match=r"\[6\]"):
        RIADDetector(32, cell_sizes=[2, 6], widths=[4, 8])
    with pytest.raises(ConfigError, match="divisible by 16"):
        RIADDetector(40, cell_sizes=[2, 4], widths=[4, 8, 8, 8, 8])



def test_riad_rejects_an_even_map_filter_and_too_many_msgms_scales():
    with pytest.raises(ConfigError, match="map_filter_size .* odd .* got 4"):
        RIADDetector(32, cell_sizes=[2], widths=[4, 8], map_filter_size=4)
    with pytest.raises(ConfigError, match="msgms_scales=4 .* image_size=8"):
        RIADDetector(8, cell_sizes=[2], widths=[4, 8])
    RIADDetector(8, cell_sizes=[2], widths=[4, 8], msgms_scales=3)  # 8 >> 2 = 2 is enough


# -- MSGMS -----------------------------------------------------------------------------------

def test_msgms_is_zero_for_identical_images_and_bounded_otherwise():
    x, y = rand(2, 3, 32, 32, seed=0), rand(2, 3, 32, 32, seed=1)
    assert gradient_magnitude(x).shape == (2, 1, 32, 32)
    assert gms_map(x, y).shape == (2, 1, 32, 32)
    same = msgms_map(x, x)
    assert same.shape == (2, 1, 32, 32)
    assert float(same.abs().max()) < 1e-6
    assert float(msgms_loss(x, x)) < 1e-6
    diff = msgms_map(x, y, scales=4)
    assert float(diff.min()) >= 0.0 and float(diff.max()) < 1.0
    assert float(diff.mean()) > 0.05
    assert float(msgms_loss(x, y)) > 0.05


def test_msgms_sees_a_local_defect_where_it_is():
    x = rand(1, 3, 64, 64, seed=0) * 0.1 + 0.45
    y = x.clone()
    y[..., 20:28, 40:48] = 1.0
    amap = msgms_map(x, y)[0, 0]
    assert float(amap[20:28, 40:48].mean()) > 5 * float(amap[:, :16].mean())


# -- U-Net -----------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_unet_shapes(skip, upsample):
    net = UNet(3, 2, (4, 8, 16), skip=skip, upsample=upsample, norm="batch",
               convs_per_block=1, out_activation="sigmoid").eval()
    with torch.no_grad():
        out = net(rand(2, 3, 16, 24))
    assert out.shape == (2, 2, 16, 24)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_unet_rejects_indivisible_input_and_bad_options():
    with pytest.raises(ConfigError, match="divisible by 4"):
        UNet(3, 3, (4, 8, 8))(rand(1, 3, 10, 12))
    with pytest.raises(ConfigError, match="upsample"):
        UNet(upsample="nearest")


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_unet_exports_to_onnx_with_the_dynamo_exporter(upsample, tmp_path):
    import onnxruntime as ort  # a hard dependency (pyproject): a missing one must fail, not skip
    torch.manual_seed(0)
    net = UNet(3, 3, (4, 8, 8), upsample=upsample, out_activation=None).eval()
    x = rand(2, 3, 16, 16)
    path = tmp_path / "unet.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False,
                      input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


# -- the detector ----------------------------------------------------------------------------

def test_reconstruction_takes_each_output_where_its_input_was_hidden():
    detector = RIADDetector(16, cell_sizes=[4], widths=[4, 8]).eval()
    seen = []

    def spy(module, args, output):
        seen.append(args[0].detach().clone())

    detector.unet.register_forward_hook(spy)
    x = rand(2, 3, 16, 16)
    with torch.no_grad():
        detector(x)
    masked = seen[0].unflatten(0, (1, 3, 2))[0]  # (n, B, 3, S, S)
    hidden = detector.test_masks[0]  # (n, 1, S, S)
    normed = detector.normalize_input(x)
    for i in range(3):
        # copy i shows exactly the cells outside group i
        assert torch.equal(masked[i] * hidden[i], torch.zeros_like(masked[i]))
        assert torch.allclose(masked[i] * (1 - hidden[i]), normed * (1 - hidden[i]))


def test_validation_loss_is_deterministic():
    detector = RIADDetector(16, cell_sizes=[2, 4], widths=[4, 8]).eval()
    batch = {"image": rand(2, 3, 16, 16)}
    torch.manual_seed(0)
    a = detector.validation_step(batch)
    torch.manual_seed(1)  # validation must not depend on the global generator
    b = detector.validation_step(batch)
    assert set(a) == {"loss", "l2", "msgms", "ssim"}
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_test_masks_are_fixed_by_the_seed():
    a = RIADDetector(32, cell_sizes=[2, 16], widths=[4, 8], mask_seed=3)
    b = RIADDetector(32, cell_sizes=[2, 16], widths=[4, 8], mask_seed=3)
    assert a.test_masks.shape == (2, 3, 1, 32, 32)
    assert torch.equal(a.test_masks, b.test_masks)
    assert torch.equal(a.test_masks.sum(1), torch.ones(2, 1, 32, 32))
