"""Core contracts: Estimator, GenerativeModel, Detector, AnomalyOutput.

Follows scikit-learn's rule: ``__init__`` stores its arguments and builds
submodules, nothing else. The arguments are recorded automatically in
``self.config`` (a plain dict), so a checkpoint can rebuild the object with
``type(model)(**config)``. Learned state that is not a parameter ends in ``_``
and is a registered buffer (``threshold_``), so it is saved and exported.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from anomalykit.errors import ConfigError, check_choice
from anomalykit.nn.normalization import NORMALIZATIONS, register_input_stats


class AnomalyOutput(NamedTuple):
    """What every detector's ``forward`` returns.

    score: (B,) image anomaly score, higher = more anomalous.
    anomaly_map: (B, 1, H, W) pixel anomaly map at the detector's input size.
    """

    score: Tensor
    anomaly_map: Tensor


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Configs must be YAML/``weights_only``-safe: plain scalars, lists and dicts."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, where)
        return
    raise ConfigError(f"{where}: config value {value!r} of type {type(value).__name__} is not a plain value")


class Estimator(nn.Module):
    """Base of everything trainable.

    Subclasses implement ``training_step(batch) -> dict[str, Tensor]`` (with a
    ``"loss"`` entry) and ``configure_optimizers()``, plus the hooks they need (below).
    Models that alternate several optimizers (GANs) set ``manual_optimization = True``
    and step the optimizers themselves inside ``training_step(batch, optimizers)``.
    Closed-form models (PCA, GMM) set ``closed_form = True`` and implement
    :meth:`solve` and :meth:`per_sample_loss`. Nobody overrides :meth:`fit`.
    """

    registry_name: str = ""
    registry_kind: str = ""
    manual_optimization: bool = False
    # Closed-form models (PCA, GMM) set this and implement solve/per_sample_loss.
    closed_form: bool = False
    # A closed-form model whose solve is torch-only sets this: the loop runs solve on its
    # device (GPU) instead of the CPU.
    solve_on_device: bool = False
    # Steps done so far; set by the training loop (warm-up, schedules).
    global_step: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            # Only the outermost __init__ records: super().__init__ calls see the flag.
            if "_config_recorded" not in self.__dict__:
                try:
                    bound = signature.bind(self, *args, **kw)
                except TypeError as exc:  # an unknown or missing option, e.g. from --model-set
                    options = [p for p in list(signature.parameters)[1:]
                               if signature.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
                    raise ConfigError(f"{cls.__name__}: {exc}; its options: "
                                      f"{', '.join(options)}") from None
                bound.apply_defaults()
                config: dict[str, Any] = {}
                for name, value in list(bound.arguments.items())[1:]:
                    kind = signature.parameters[name].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        config.update(value)
                    elif kind is inspect.Parameter.VAR_POSITIONAL:
                        raise TypeError(f"{cls.__name__}: *args cannot be recorded in a config")
                    else:
                        config[name] = list(value) if isinstance(value, tuple) else value
                _check_plain(config, cls.__name__)
                object.__setattr__(self, "_config_recorded", True)
                object.__setattr__(self, "config", config)
            init(self, *args, **kw)

        cls.__init__ = recording_init

    # -- training hooks -------------------------------------------------------------------
    # The loop (anomalykit.training.fit) owns epochs, devices, checkpoints and resume and calls
    # these; a model supplies what differs. Order in one fit:
    #   setup_fit -> configure_optimizers -> [on_train_epoch_start -> (training_step ->
    #   on_after_optimizer_step) per batch -> validation_step per val batch ->
    #   on_train_epoch_end] per epoch -> on_fit_end.
    def setup_fit(self, train_data: Any, val_data: Any, *, batch_size: int, num_workers: int,
                  progress: bool) -> tuple[Any, Any]:
        """Prepare what the loop iterates; default: the data unchanged.

        Called after seeding and moving the model to the training device, before
        :meth:`configure_optimizers`. Returns ``(train, val)`` (``val`` may be None), e.g.
        caches of frozen backbone features. Its time is part of the history's ``seconds`` and
        reported as ``setup_seconds``.
        """
        return train_data, val_data

    def training_step(self, batch: dict[str, Any], *args: Any) -> dict[str, Tensor]:
        """One batch -> losses ``{"loss": scalar, ...}`` (extra entries are logged).

        Automatic optimization: the loop back-propagates ``"loss"`` and steps the optimizer.
        With ``manual_optimization = True`` the signature is
        ``training_step(batch, optimizers)``: the model zeroes, back-propagates and steps its
        own optimizers (several, alternating: GANs) and returns detached losses to log.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement training_step")

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Loss on held-out good images; by default the training loss without gradients.

        Manually optimized models must override it (their training_step steps optimizers).
        """
        return self.training_step(batch)

    def on_train_epoch_start(self, epoch: int, epochs: int,
                             optimizers: list[torch.optim.Optimizer]) -> None:
        """Called by the trainer before each epoch (0-based ``epoch`` of ``epochs``); no-op.

        ``optimizers`` are those of :meth:`configure_optimizers`, as a list. Override for
        per-epoch state that must survive a resume without saving anything, e.g. a
        learning rate set from the epoch (DRAEM's steps).
        """

    def on_after_optimizer_step(self, step: int) -> None:
        """Called after every training step's update (``step`` counts from 1); no-op.

        E.g. an exponential moving average of the weights. ``self.global_step`` holds the
        number of steps done before the current one while ``training_step`` runs.
        """

    def on_train_epoch_end(self, epoch: int, epochs: int, *, out_dir: Any = None) -> None:
        """Called after each epoch's training, validation and history update, before its
        checkpoint; no-op. ``out_dir`` is the run's folder (a Path) or None.

        E.g. a generative model saving a grid of samples under ``out_dir`` to show how
        training goes (GANs fail silently: a collapsed generator still has a loss).
        """

    def on_fit_end(self, train_data: Any) -> None:
        """Called once after training (best weights restored) with the ORIGINAL train data.

        E.g. fitting a prior over latent codes. No-op by default.
        """

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer] | dict:
        """The optimizers, and optionally learning-rate schedulers.

        Return one optimizer, a list of them (manual optimization only, when more than one),
        or ``{"optimizers": opt or [opts], "schedulers": sched or [scheds],
        "interval": "epoch" | "step"}``: the loop steps the schedulers after every epoch
        (default) or every training step, and saves their state in ``last.ckpt``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement configure_optimizers")

    # -- closed-form models (closed_form = True) -------------------------------------------
    def solve(self, images: Tensor, *, seed: int,
              progress: Callable[[str, int, int], None] | None = None) -> None:
        """Fit in one pass on every training image at once ((N, ...) on the CPU).

        ``progress(stage, done, total)``, when given, reports a long solve's progress (the
        loop's progress bar shows it).
        """
        raise NotImplementedError(f"{type(self).__name__} sets closed_form but has no solve")

    def per_sample_loss(self, images: Tensor) -> Tensor:
        """(N,) loss of a closed-form model on ``images``, reported in the history."""
        raise NotImplementedError(f"{type(self).__name__} sets closed_form but has no "
                                  "per_sample_loss")

    def fit(self, train_data, val_data=None, **trainer_options: Any) -> dict[str, Any]:
        """Train with the toolkit's one loop (see :func:`anomalykit.training.fit`).

        Subclasses do not override this: what a model needs around training goes into the
        hooks above (``setup_fit``, ``on_fit_end``, ...), or ``solve`` for closed-form models.
        """
        from anomalykit.training import fit

        return fit(self, train_data, val_data, **trainer_options)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def save(self, path, **extra: Any) -> None:
        """Write config + weights + buffers atomically (loadable with ``weights_only=True``)."""
        from anomalykit.training.checkpoint import save_checkpoint

        save_checkpoint(path, self, **extra)

    @staticmethod
    def load(path, map_location: str | torch.device = "cpu") -> Estimator:
        from anomalykit.training.checkpoint import load_model

        return load_model(path, map_location=map_location)


class GenerativeModel(Estimator):
    """A model of the data distribution: sample, and where the family allows, score."""

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot sample")

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no tractable log-likelihood")

    def reconstruct(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct")


class Detector(Estimator):
    """An anomaly detector trained on good images only.

    ``forward(images)`` with images (B, 3, S, S) in [0, 1], S = ``self.image_size``,
    returns :class:`AnomalyOutput`. It is the inference path and the only thing
    exported; it never branches on ``self.training``.

    Calibration buffers (set by :meth:`calibrate` from held-out good images):
    ``threshold_`` (image score threshold), ``score_min_``/``score_max_`` (the
    good-score range, for the normalised score), ``pixel_threshold_``, and
    ``calibration_record_`` (how they were set, read as :attr:`calibration_record`).
    """

    image_size: int
    # What export_onnx's check allows between onnxruntime and PyTorch (absolute, times the
    # output's magnitude above 1). Only a detector whose inference amplifies float rounding
    # (an unrolled iterative search) may loosen it, with the measurement in its docstring.
    export_tolerance: float = 1e-4

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold_", torch.tensor(0.0))
        self.register_buffer("score_min_", torch.tensor(0.0))
        self.register_buffer("score_max_", torch.tensor(1.0))
        self.register_buffer("pixel_threshold_", torch.tensor(0.0))
        self.register_buffer("calibrated_", torch.tensor(False))
        # JSON of calibration_record (uint8 bytes; empty until calibrate).
        self.register_buffer("calibration_record_", torch.zeros(0, dtype=torch.uint8))

    def set_normalization(self, normalization: str) -> None:
        """Register input mean/std buffers for one of :data:`NORMALIZATIONS`."""
        check_choice("normalization", normalization, NORMALIZATIONS)
        mean, std = NORMALIZATIONS[normalization]
        register_input_stats(self, mean, std, persistent=False)

    def normalize_input(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the detector's own input range."""
        return (images - self.input_mean) / self.input_std

    def forward(self, images: Tensor) -> AnomalyOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit_summary(self) -> list[str]:
        """Facts about the fitted model a benchmark row should carry (e.g. a memory bank's
        size), as short sentences; none by default."""
        return []

    def normalized_score(self, score: Tensor) -> Tensor:
        """Map a raw score to [0, 1] with the threshold at exactly 0.5 (anomalib's convention)."""
        span = (self.score_max_ - self.score_min_).clamp_min(1e-12)
        return ((score - self.threshold_) / span + 0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def calibrate(self, good_data, *, rule: str | None = None, quantile: float | None = None,
                  margin: float | None = None, fpr: float | None = None, tail: str | None = None,
                  pixel_quantile: float = 0.999, batch_size: int = 16,
                  progress: bool = False) -> float:
        """Set the thresholds from held-out GOOD images (never the test set).

        good_data: an :class:`~anomalykit.data.AnomalyDataset`, a DataLoader, or a
        tensor (N, 3, S, S) in [0, 1]. Returns the image threshold.

        The image threshold follows ``rule`` (see
        :func:`anomalykit.metrics.threshold.calibrate_threshold`): ``"quantile"`` (the
        ``quantile`` of the good scores plus ``margin`` standard deviations; 1.0 = their
        maximum) or ``"fpr"`` (a target false-alarm rate ``fpr`` on good images from a
        ``tail`` model: ``gpd``, ``gaussian``, ``lognormal``). The pixel threshold is the
        ``pixel_quantile`` of the good maps' pixels. How it was set is kept in
        :attr:`calibration_record` (saved, loaded and exported with the model).
        """
        import warnings

        import numpy as np

        from anomalykit.metrics.threshold import calibrate_threshold
        from anomalykit.training.inference import predict

        # Options first (on a dummy score): a typo must not cost a pass over the images.
        calibrate_threshold(np.zeros(1), rule=rule, quantile=quantile, margin=margin, fpr=fpr,
                            tail=tail)
        result = predict(self, good_data, batch_size=batch_size, progress=progress,
                         desc="calibrate")
        if len(result["scores"]) == 0:
            raise ConfigError("calibrate needs at least one good image")
        scores = result["scores"]
        threshold, record = calibrate_threshold(scores, rule=rule, quantile=quantile,
                                                margin=margin, fpr=fpr, tail=tail)
        if record.get("fallback"):
            warnings.warn(f"calibrate: {record['fallback']}", UserWarning, stacklevel=2)
        record["pixel_quantile"] = float(pixel_quantile)
        pixel_threshold = float(np.quantile(result["maps"], pixel_quantile))
        device = self.threshold_.device
        self.threshold_.copy_(torch.tensor(threshold, device=device))
        self.score_min_.copy_(torch.tensor(float(scores.min()), device=device))
        self.score_max_.copy_(torch.tensor(float(max(scores.max(), threshold)), device=device))
        self.pixel_threshold_.copy_(torch.tensor(pixel_threshold, device=device))
        self.calibrated_.fill_(True)
        self.calibration_record = record
        return threshold

    @property
    def calibration_record(self) -> dict[str, Any]:
        """How the thresholds were set (rule, rate, tail model and parameters, number of good
        images, ...; see :func:`anomalykit.metrics.threshold.calibrate_threshold`); ``{}``
        before :meth:`calibrate` and for checkpoints written before the record existed."""
        raw = bytes(self.calibration_record_.cpu().numpy().tobytes())
        return json.loads(raw.decode("utf-8")) if raw else {}

    @calibration_record.setter
    def calibration_record(self, record: dict[str, Any]) -> None:
        # A uint8 buffer of JSON: a buffer is what save/load, state_dict and device moves
        # already carry; a plain attribute would be lost by load_state_dict.
        data = json.dumps(record, sort_keys=True).encode("utf-8")
        self._buffers["calibration_record_"] = torch.tensor(
            list(data), dtype=torch.uint8, device=self.calibration_record_.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "calibration_record_"
        if key in state_dict:
            # Its length is the JSON's: take the incoming shape before copying.
            self._buffers["calibration_record_"] = torch.empty_like(
                state_dict[key], device=self.calibration_record_.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # a checkpoint from before the record: load it without
