"""The toolkit's one training loop.

Seeding, device choice, progress bars, atomic checkpoints with exact resume, early
stopping on the validation loss, learning-rate schedulers, optional mixed precision,
and a clear error when a loss stops being finite. Models supply ``training_step`` and
``configure_optimizers`` plus the hooks they need (see :class:`anomalykit.base.Estimator`:
``setup_fit``, ``on_train_epoch_start``, ``on_after_optimizer_step``,
``on_train_epoch_end``, ``on_fit_end``);
GANs take the manual path (``manual_optimization = True``: ``training_step(batch,
optimizers)`` steps its own optimizers). Closed-form models (PCA, GMM: ``closed_form =
True``) go through the same :func:`fit`, which hands their ``solve`` all training images at
once and keeps the bookkeeping (seed, device, history, ``last.ckpt``) here.

Launched by ``torchrun`` with several processes, the same :func:`fit` trains data-parallel
(DistributedDataParallel, a sharded sampler, losses averaged across processes, rank 0 alone
writing checkpoints and showing progress); ``batch_size`` is then per process. See
:mod:`anomalykit.training.distributed`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from anomalykit.errors import ConfigError, TrainingError
from anomalykit.training import distributed
from anomalykit.training.checkpoint import load_state_into, read_checkpoint, save_checkpoint
from anomalykit.training.inference import as_loader, evaluating
from anomalykit.training.progress import progress_bar
from anomalykit.training.seed import resolve_device, seed_everything

LAST = "last.ckpt"
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fit's per-epoch report: (0-based epoch, mean training losses, validation loss or None).
EpochCallback = Callable[[int, dict[str, float], "float | None"], None]


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in ``obj`` to ``device``, through lists, tuples and dicts.

    Cached features are lists of tensors inside the batch dict: a top-level-only move would
    leave them on the CPU while the model is on the GPU.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        items = [move_to_device(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def configure(model) -> tuple[list[torch.optim.Optimizer], list[Any], str]:
    """``model.configure_optimizers()`` -> (optimizers, schedulers, scheduler interval), checked."""
    spec = model.configure_optimizers()
    schedulers, interval = [], "epoch"
    if isinstance(spec, dict):
        unknown = set(spec) - {"optimizers", "schedulers", "interval"}
        if unknown or "optimizers" not in spec:
            raise ConfigError(f"{type(model).__name__}.configure_optimizers returned a dict with keys "
                              f"{sorted(spec)}; expected optimizers, schedulers, interval")
        schedulers, interval = _as_list(spec.get("schedulers")), spec.get("interval", "epoch")
        if interval not in ("epoch", "step"):
            raise ConfigError(f"scheduler interval must be one of epoch, step; got {interval!r}")
        spec = spec["optimizers"]
    optimizers = _as_list(spec)
    if not optimizers:
        raise ConfigError(f"{type(model).__name__}.configure_optimizers returned no optimizer")
    if len(optimizers) > 1 and not model.manual_optimization:
        raise ConfigError(
            f"{type(model).__name__} returns {len(optimizers)} optimizers: several optimizers need "
            "manual optimization (set manual_optimization = True and step them in "
            "training_step(batch, optimizers))")
    return optimizers, schedulers, interval


def loss_info(losses: dict[str, float], limit: int = 4) -> str:
    """The progress bar's text: "loss" first, then up to ``limit`` - 1 other logged losses
    (a GAN's two players: ``d_loss 0.69 g_loss 0.71``)."""
    names = (["loss"] if "loss" in losses else []) + [k for k in losses if k != "loss"]
    return " ".join(f"{k} {losses[k]:.4g}" for k in names[:limit])


def _check_finite(losses: dict[str, torch.Tensor | float], epoch: int, step: int, out_dir,
                  where: str = "") -> None:
    for name, value in losses.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            hint = f"; the last good state is in {Path(out_dir) / LAST}" if out_dir else ""
            raise TrainingError(
                f"loss {name!r} became {v}{where} at epoch {epoch + 1}, step {step}: lower the "
                f"learning rate or check the input data{hint}")


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def _reseed_data(data: Any, seed: int) -> None:
    """Reseed a dataset's own augmentation generator (if it has one) for this epoch.

    An augmenting dataset with a private generator would otherwise continue its stream in
    an uninterrupted run but restart it after a resume.
    """
    dataset = getattr(data, "dataset", data)
    reseed = getattr(dataset, "reseed", None)
    if callable(reseed):
        reseed(seed)


def _preload_for_workers(data: Any, num_workers: int) -> None:
    """Fill a dataset's decode-once cache before DataLoader workers copy it.

    Workers are new processes every epoch: what they cache is lost when they exit, so the
    main process decodes everything once first (see AnomalyDataset.preload).
    """
    preload = getattr(getattr(data, "dataset", data), "preload", None)
    if num_workers > 0 and callable(preload):
        preload()


def fit(model, train_data, val_data=None, *, epochs: int = 10, max_steps: int | None = None,
        batch_size: int = 16, num_workers: int = 0, device: str = "auto", seed: int = 0,
        out_dir: str | Path | None = None, resume: bool = False,
        early_stopping_patience: int | None = None, grad_clip: float | None = None,
        precision: Precision = "fp32", progress: bool = True, sync_batchnorm: bool = True,
        distributed_backend: str | None = None,
        epoch_callback: EpochCallback | None = None) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` (Dataset, DataLoader or image tensor).

    Each epoch reseeds with ``seed + epoch`` so a resumed run sees the same data
    order and augmentations as an uninterrupted one. With ``out_dir``,
    ``last.ckpt`` (weights + optimizers + schedulers + history) is written atomically after
    every epoch; ``resume=True`` continues from it. With ``val_data`` and
    ``early_stopping_patience``, training stops after that many epochs without
    a better validation loss and the best weights are restored. ``precision`` "bf16" or
    "fp16" runs the steps under autocast (for GPUs; fp16 with a gradient scaler).

    Under ``torchrun`` with several processes the fit is data-parallel (see
    :mod:`anomalykit.training.distributed`): ``batch_size`` is per process, ``sync_batchnorm``
    turns BatchNorm into SyncBatchNorm on CUDA during the fit, ``distributed_backend``
    (nccl, gloo; None = nccl on CUDA, gloo on the CPU) forces the process group's backend.
    Both have no effect in a single process.

    ``epoch_callback(epoch, train_loss, val_loss)`` is called after each epoch (once its
    checkpoint is written), on rank 0 only: the 0-based epoch, that epoch's mean training
    losses (``{"loss": ...}``, a GAN's ``d_loss``/``g_loss``) and the validation loss or None.
    Experiment tracking hooks in here (:meth:`anomalykit.tracking.RunLog.log_epoch`).

    Returns the history: per-epoch mean losses, best epoch, seconds (setup included, also
    given alone as ``setup_seconds``), steps.
    """
    check_options(model, epochs=epochs, val_data=val_data,
                  early_stopping_patience=early_stopping_patience, grad_clip=grad_clip,
                  precision=precision, resume=resume, out_dir=out_dir)
    if epoch_callback is not None and not callable(epoch_callback):
        raise ConfigError(f"epoch_callback must be a function (epoch, train_loss, val_loss), got "
                          f"{epoch_callback!r}")
    device = resolve_device(device)
    parallel = distributed.setup(device, backend=distributed_backend,
                                 sync_batchnorm=sync_batchnorm)
    if parallel is not None:
        device = parallel.device
        progress = progress and parallel.is_main
    if parallel is not None and not parallel.is_main:
        epoch_callback = None  # rank 0 alone reports
    if model.closed_form:
        return fit_closed_form(model, train_data, val_data, epochs=epochs, max_steps=max_steps,
                               batch_size=batch_size, num_workers=num_workers, device=device,
                               seed=seed, out_dir=out_dir, progress=progress, _parallel=parallel,
                               epoch_callback=epoch_callback)
    seed_everything(seed)
    model.to(device)
    last_path = Path(out_dir) / LAST if out_dir else None
    # The weights come back before setup_fit, so caches are computed with the saved model.
    state = read_checkpoint(last_path, map_location=device) if resume and last_path.exists() else None
    if state is not None:
        if "training" not in state:
            raise TrainingError(f"{last_path} holds no training state (a finished model.ckpt?); "
                                "remove it to train from scratch")
        # Resizes buffers whose shape is only known after fitting, as load_model does.
        load_state_into(model, state["state_dict"], source=str(last_path))
    started = time.perf_counter()
    original_train = train_data
    _preload_for_workers(train_data, num_workers)
    train_data, val_data = model.setup_fit(train_data, val_data, batch_size=batch_size,
                                           num_workers=num_workers, progress=progress)
    setup_seconds = time.perf_counter() - started
    optimizers, schedulers, interval = configure(model)
    if parallel is not None and isinstance(train_data, torch.utils.data.DataLoader):
        raise ConfigError(f"data-parallel training shards the training data itself, but "
                          f"{type(model).__name__}.setup_fit returned a DataLoader: return a Dataset")
    # One step function: DDP around training_step (data-parallel), or training_step itself.
    step_fn = model.training_step if parallel is None else parallel.wrap(model, optimizers)
    rank_seed = 0 if parallel is None else parallel.rank * distributed.RANK_SEED_STRIDE
    where = "" if parallel is None else f" (mean over {parallel.world} processes)"
    write_dir = out_dir if parallel is None or parallel.is_main else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "best_epoch": None,
                               "best_val_loss": None, "epochs_run": 0, "steps": 0,
                               "seconds": 0.0, "setup_seconds": 0.0, "stopped_early": False}
    start_epoch, best_state = 0, None
    if state is not None:
        training = state["training"]
        try:
            for opt, opt_state in zip(optimizers, training["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
            for sched, sched_state in zip(schedulers, training.get("schedulers", []), strict=True):
                sched.load_state_dict(sched_state)
        except (ValueError, KeyError) as exc:
            raise TrainingError(f"{last_path} was written with other optimizers or schedulers than "
                                f"{type(model).__name__} has now ({exc}); remove it to train from "
                                "scratch") from exc
        if training.get("scaler"):
            scaler.load_state_dict(training["scaler"])
        history = training["history"]
        start_epoch = history["epochs_run"]
        best_state = training.get("best_state")
        if history["stopped_early"] or (max_steps is not None and history["steps"] >= max_steps):
            start_epoch = epochs  # that run had finished: resuming must not train further
    # seconds = this run's setup + the training time of every run so far.
    earlier_seconds = history["seconds"] - history.get("setup_seconds", 0.0)
    history["setup_seconds"] = setup_seconds

    step = first_step = history["steps"]
    with progress_bar(progress) as bar:
        task = bar.add_task(f"train {model.registry_name}", total=epochs, completed=start_epoch,
                            info="")
        for epoch in range(start_epoch, epochs):
            seed_everything(seed + epoch + rank_seed)
            _reseed_data(train_data, seed + epoch + rank_seed)
            model.on_train_epoch_start(epoch, epochs, optimizers)
            generator = torch.Generator().manual_seed(seed + epoch)
            if parallel is None:
                loader = as_loader(train_data, batch_size=batch_size, shuffle=True,
                                   generator=generator, num_workers=num_workers)
                model.train()
            else:
                loader = parallel.train_loader(train_data, batch_size=batch_size,
                                               generator=generator, epoch=epoch,
                                               num_workers=num_workers)
                parallel.train(model)
            totals: dict[str, float] = {}
            n_batches = 0
            for batch in loader:
                batch = move_to_device(batch, device)
                model.global_step = step
                if model.manual_optimization:
                    with _autocast(device, precision):
                        losses = step_fn(batch, optimizers)
                    logged = _logged(losses, parallel)
                    _check_finite(logged, epoch, step, out_dir, where)
                else:
                    with _autocast(device, precision):
                        losses = step_fn(batch)
                    # Before backward: every process must agree to stop, or DDP would wait.
                    logged = _logged(losses, parallel)
                    _check_finite(logged, epoch, step, out_dir, where)
                    optimizer = optimizers[0]
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(losses["loss"]).backward()
                    if grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(
                            [p for group in optimizer.param_groups for p in group["params"]], grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                step += 1
                if parallel is not None and step == first_step + 1:
                    parallel.after_first_step(model)
                model.global_step = step
                model.on_after_optimizer_step(step)
                if interval == "step":
                    for sched in schedulers:
                        sched.step()
                for k, v in logged.items():
                    totals[k] = totals.get(k, 0.0) + (float(v.detach()) if isinstance(v, torch.Tensor)
                                                      else v)
                n_batches += 1
                if max_steps is not None and step >= max_steps:
                    break
            if n_batches == 0:
                raise ConfigError("the training set is empty")
            if interval == "epoch":
                for sched in schedulers:
                    sched.step()
            train_loss = {k: v / n_batches for k, v in totals.items()}
            history["train_loss"].append(train_loss)
            info = loss_info(train_loss)

            if parallel is not None:
                parallel.end_of_epoch(model)
            if val_data is not None:
                val_loss = _validate(model, val_data, batch_size, device, precision, parallel)
                history["val_loss"].append(val_loss)
                info += f" val {val_loss:.4g}"
                if history["best_val_loss"] is None or val_loss < history["best_val_loss"]:
                    history["best_val_loss"], history["best_epoch"] = val_loss, epoch
                    if early_stopping_patience is not None:  # only then restored at the end
                        best_state = {k: v.detach().cpu().clone()
                                      for k, v in model.state_dict().items()}
            history["epochs_run"] = epoch + 1
            history["steps"] = step
            history["seconds"] = earlier_seconds + time.perf_counter() - started
            bar.update(task, advance=1, info=info)
            model.on_train_epoch_end(epoch, epochs, out_dir=Path(write_dir) if write_dir else None)

            stop = max_steps is not None and step >= max_steps
            if (early_stopping_patience is not None and history["best_epoch"] is not None
                    and epoch - history["best_epoch"] >= early_stopping_patience):
                history["stopped_early"] = stop = True
            if last_path is not None and write_dir is not None:
                save_checkpoint(last_path, model, training={
                    "optimizers": [opt.state_dict() for opt in optimizers],
                    "schedulers": [sched.state_dict() for sched in schedulers],
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "history": copy.deepcopy(history),
                    "best_state": best_state,
                })
            if epoch_callback is not None:
                epoch_callback(epoch, train_loss, history["val_loss"][-1] if val_data is not None
                               else None)
            if stop:
                break

    if parallel is not None:
        step_fn = None  # the DDP wrapper goes with it: on_fit_end may train again (a prior)
        parallel.finish(model)
    if best_state is not None and early_stopping_patience is not None:
        load_state_into(model, best_state, source="best_state")
    model.on_fit_end(original_train)
    history["seconds"] = earlier_seconds + time.perf_counter() - started
    return history


def check_options(model, *, epochs: int, val_data: Any, early_stopping_patience: int | None,
                  grad_clip: float | None, precision: str, resume: bool = False,
                  out_dir: Any = None) -> None:
    """Refuse option combinations the loop cannot honour, before any work is done."""
    from anomalykit.base import Estimator

    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if early_stopping_patience is not None and val_data is None:
        raise ConfigError("early_stopping_patience needs validation data (val_fraction > 0)")
    if early_stopping_patience is not None and early_stopping_patience < 1:
        raise ConfigError(f"early_stopping_patience must be >= 1 (epochs without a better "
                          f"validation loss), got {early_stopping_patience}")
    if grad_clip is not None and grad_clip < 0:
        raise ConfigError(f"grad_clip must be > 0 (a gradient-norm bound) or 0/None, got {grad_clip}")
    if resume and out_dir is None:
        raise ConfigError("resume=True needs out_dir, where last.ckpt lives")
    if model.closed_form:
        if type(model).solve is Estimator.solve:
            raise ConfigError(f"{type(model).__name__} sets closed_form = True but does not "
                              "implement solve")
        return
    if model.manual_optimization:
        if grad_clip:
            raise ConfigError(f"grad_clip is not applied under manual optimization: "
                              f"{type(model).__name__} steps its own optimizers, so clip inside "
                              "its training_step (torch.nn.utils.clip_grad_norm_)")
        if precision == "fp16":
            raise ConfigError("precision fp16 needs a gradient scaler per optimizer, which manual "
                              "optimization does not get; use bf16 or fp32")
        if val_data is not None and type(model).validation_step is Estimator.validation_step:
            raise ConfigError(f"{type(model).__name__} uses manual optimization, so its "
                              "training_step steps optimizers and cannot validate: implement "
                              "validation_step, or train without validation data (val_fraction 0)")


def collect_images(data, *, batch_size: int = 16, max_steps: int | None = None,
                   num_workers: int = 0) -> torch.Tensor:
    """Every ``batch["image"]`` of ``data`` (Dataset, DataLoader or tensor) as one CPU tensor.

    In order, unshuffled: a closed-form fit does not depend on the data order. With
    ``max_steps``, only the first ``max_steps`` batches are read (a "step" of a
    closed-form model is one batch of data seen).
    """
    loader = as_loader(data, batch_size=batch_size, num_workers=num_workers)
    batches = []
    for batch in loader:
        batches.append(batch["image"].detach().cpu())
        if max_steps is not None and len(batches) >= max_steps:
            break
    if not batches:
        raise ConfigError("the training set is empty")
    return torch.cat(batches)


# The history's training loss of a closed-form model is measured on at most this many training
# images, evenly spaced: a fitted closed-form model's in-sample loss is a sanity figure, and
# for backbone detectors (PaDiM, PatchCore) a pass over every training image would cost as
# much as the fit's own feature extraction again.
CLOSED_FORM_TRAIN_LOSS_IMAGES = 32


@torch.no_grad()
def fit_closed_form(model, train_data, val_data=None, *, epochs: int = 1,
                    max_steps: int | None = None, batch_size: int = 16, num_workers: int = 0,
                    device: str | torch.device = "auto", seed: int = 0,
                    out_dir: str | Path | None = None, progress: bool = True,
                    _parallel: distributed.DataParallel | None = None,
                    epoch_callback: EpochCallback | None = None) -> dict[str, Any]:
    """:func:`fit` for a closed-form model: one ``model.solve`` on every training image.

    ``model.solve(images, seed=seed, progress=report)`` fits on all training images at once
    (a CPU tensor, see :func:`collect_images`) and may call ``report(stage, done, total)`` to
    drive the progress bar. It runs on the CPU (numpy/scipy/scikit-learn linear algebra)
    unless the model sets ``solve_on_device = True`` (torch-only solves: PaDiM, PatchCore),
    then on ``device``. ``model.per_sample_loss(images)`` (N,) is what the history reports:
    on the validation images, and on at most :data:`CLOSED_FORM_TRAIN_LOSS_IMAGES` evenly
    spaced training images (``history["train_loss_images"]``). There are no iterations:
    ``epochs``, ``resume``, ``early_stopping_patience`` and ``grad_clip`` are accepted by
    :func:`fit` so one config trains any model, and have no effect. With ``out_dir`` the
    fitted model is written to ``last.ckpt`` like an iterative run's last epoch.

    Data-parallel (``_parallel``, from :func:`fit` under torchrun): every process solves on
    all images, then takes rank 0's state; rank 0 alone writes ``last.ckpt``.
    ``epoch_callback`` (see :func:`fit`) is called once, for epoch 0, at the end.
    """
    device = resolve_device(device)
    seed_everything(seed)
    started = time.perf_counter()
    loss: Callable[[torch.Tensor], torch.Tensor] = model.per_sample_loss
    name = f"fit {model.registry_name}"
    with progress_bar(progress) as bar:
        task = bar.add_task(name, total=1, info="")

        def report(stage: str, done: int, total: int) -> None:
            bar.update(task, description=f"{name}: {stage}", completed=done, total=total)

        images = collect_images(train_data, batch_size=batch_size, max_steps=max_steps,
                                num_workers=num_workers)
        model.to(device if model.solve_on_device else "cpu")
        model.solve(images, seed=seed, progress=report)
        model.to(device)
        if _parallel is not None:
            distributed.broadcast_state(model)

        def mean_loss(data) -> float:
            values = [loss(chunk.to(device)).double().sum().item()
                      for chunk in data.split(max(1, batch_size))]
            return sum(values) / len(data)

        with evaluating(model):
            subset = torch.linspace(0, len(images) - 1, min(len(images), CLOSED_FORM_TRAIN_LOSS_IMAGES))
            train_loss = mean_loss(images[subset.round().long()])
            history: dict[str, Any] = {
                "train_loss": [{"loss": train_loss}], "val_loss": [], "best_epoch": None,
                "best_val_loss": None, "epochs_run": 1,
                "steps": math.ceil(len(images) / max(1, batch_size)), "seconds": 0.0,
                "setup_seconds": 0.0, "stopped_early": False, "train_loss_images": len(subset),
            }
            info = f"loss {train_loss:.4g}"
            if val_data is not None:
                val_loss = mean_loss(collect_images(val_data, batch_size=batch_size,
                                                    num_workers=num_workers))
                history.update(val_loss=[val_loss], best_epoch=0, best_val_loss=val_loss)
                info += f" val {val_loss:.4g}"
        history["seconds"] = time.perf_counter() - started
        bar.update(task, description=name, completed=1, total=1, info=info)
    for value in [train_loss, *history["val_loss"]]:
        if not math.isfinite(value):
            raise TrainingError(f"closed-form fit of {type(model).__name__} gave a loss of {value}: "
                                "check the input data for NaN/inf values")
    model.on_fit_end(train_data)
    if out_dir is not None and (_parallel is None or _parallel.is_main):
        save_checkpoint(Path(out_dir) / LAST, model,
                        training={"optimizers": [], "schedulers": [], "history": copy.deepcopy(history),
                                  "best_state": None})
    if _parallel is not None:
        _parallel.finish(model)
    if epoch_callback is not None and (_parallel is None or _parallel.is_main):
        epoch_callback(0, dict(history["train_loss"][0]),
                       history["val_loss"][0] if history["val_loss"] else None)
    return history


def _logged(losses: dict[str, torch.Tensor], parallel) -> dict[str, Any]:
    """The step's losses as logged: as returned, or averaged over processes (floats)."""
    return losses if parallel is None else parallel.mean_losses(losses)


@torch.no_grad()
def _validate(model, val_data, batch_size: int, device: torch.device, precision: str,
              parallel: distributed.DataParallel | None = None) -> float:
    """Mean validation loss per image; data-parallel: each process scores its shard and the
    sums are added up, so every process gets the same number (and takes the same branch)."""
    total, n = 0.0, 0
    if parallel is not None:
        shard = parallel.val_shard(val_data)
        val_data = shard if shard is not None else val_data
    with evaluating(model):
        for batch in as_loader(val_data, batch_size=batch_size):
            batch = move_to_device(batch, device)
            with _autocast(device, precision):
                loss = model.validation_step(batch)["loss"]
            count = len(batch["image"])
            total += float(loss) * count
            n += count
    if parallel is not None:
        total, n = parallel.sum([total, float(n)])
    return total / max(n, 1)
