"""The toolkit's one training loop.

Seeding, device choice, progress bars, atomic checkpoints with resume, early
stopping on the validation loss, and a clear error when a loss stops being
finite. Models supply ``training_step`` and ``configure_optimizers`` (see
:class:`anomalykit.base.Estimator`).

Closed-form models (PCA, GMM) set the class attribute ``closed_form = True`` and
override ``fit``; :func:`fit` hands them over to it, and they do the shared
bookkeeping (seed, device, collecting the data, history) with
:func:`fit_closed_form`, so ``fit(model, ...)`` and ``model.fit(...)`` accept the
same options and return the same history for every model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from anomalykit.errors import ConfigError, TrainingError
from anomalykit.training.checkpoint import load_state_into, read_checkpoint, save_checkpoint
from anomalykit.training.inference import as_loader
from anomalykit.training.progress import progress_bar
from anomalykit.training.seed import resolve_device, seed_everything

LAST = "last.ckpt"


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _optimizers(model) -> list[torch.optim.Optimizer]:
    opt = model.configure_optimizers()
    return list(opt) if isinstance(opt, (list, tuple)) else [opt]


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, step: int, out_dir) -> None:
    for name, value in losses.items():
        v = float(value.detach())
        if not math.isfinite(v):
            hint = f"; the last good state is in {Path(out_dir) / LAST}" if out_dir else ""
            raise TrainingError(
                f"loss {name!r} became {v} at epoch {epoch + 1}, step {step}: lower the learning "
                f"rate or check the input data{hint}")


def fit(model, train_data, val_data=None, *, epochs: int = 10, max_steps: int | None = None,
        batch_size: int = 16, num_workers: int = 0, device: str = "auto", seed: int = 0,
        out_dir: str | Path | None = None, resume: bool = False,
        early_stopping_patience: int | None = None, grad_clip: float | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` (Dataset, DataLoader or image tensor).

    Each epoch reseeds with ``seed + epoch`` so a resumed run sees the same data
    order and augmentations as an uninterrupted one. With ``out_dir``,
    ``last.ckpt`` (weights + optimizer + history) is written atomically after
    every epoch; ``resume=True`` continues from it. With ``val_data`` and
    ``early_stopping_patience``, training stops after that many epochs without
    a better validation loss and the best weights are restored.

    Returns the history: per-epoch mean losses, best epoch, seconds, steps.
    """
    if getattr(model, "closed_form", False):
        from anomalykit.base import Estimator

        if type(model).fit is Estimator.fit:  # would hand back to this function forever
            raise ConfigError(f"{type(model).__name__} sets closed_form = True but does not "
                              "override fit")
        return model.fit(train_data, val_data, epochs=epochs, max_steps=max_steps,
                         batch_size=batch_size, num_workers=num_workers, device=device, seed=seed,
                         out_dir=out_dir, resume=resume,
                         early_stopping_patience=early_stopping_patience, grad_clip=grad_clip,
                         progress=progress)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if early_stopping_patience is not None and val_data is None:
        raise ConfigError("early_stopping_patience needs validation data (val_fraction > 0)")
    device = resolve_device(device)
    seed_everything(seed)
    model.to(device)
    optimizers = _optimizers(model)

    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "best_epoch": None,
                               "best_val_loss": None, "epochs_run": 0, "steps": 0,
                               "seconds": 0.0, "stopped_early": False}
    start_epoch, best_state = 0, None
    last_path = Path(out_dir) / LAST if out_dir else None
    if resume:
        if last_path is None:
            raise ConfigError("resume=True needs out_dir, where last.ckpt lives")
        if last_path.exists():
            state = read_checkpoint(last_path, map_location=device)
            # Resizes buffers whose shape is only known after fitting, as load_model does.
            load_state_into(model, state["state_dict"], source=str(last_path))
            for opt, opt_state in zip(optimizers, state["training"]["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
            history = state["training"]["history"]
            start_epoch = history["epochs_run"]
            best_state = state["training"].get("best_state")

    step = history["steps"]
    started = time.perf_counter() - history["seconds"]
    with progress_bar(progress) as bar:
        task = bar.add_task(f"train {model.registry_name}", total=epochs, completed=start_epoch,
                            info="")
        for epoch in range(start_epoch, epochs):
            seed_everything(seed + epoch)
            model.on_train_epoch_start(epoch, epochs, optimizers)
            generator = torch.Generator().manual_seed(seed + epoch)
            loader = as_loader(train_data, batch_size=batch_size, shuffle=True,
                               generator=generator, num_workers=num_workers)
            model.train()
            totals: dict[str, float] = {}
            n_batches = 0
            for batch in loader:
                batch = _to_device(batch, device)
                if model.manual_optimization:
                    losses = model.training_step(batch, optimizers)
                    _check_finite(losses, epoch, step, out_dir)
                else:
                    losses = model.training_step(batch)
                    _check_finite(losses, epoch, step, out_dir)
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    losses["loss"].backward()
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    for opt in optimizers:
                        opt.step()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
                n_batches += 1
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
            if n_batches == 0:
                raise ConfigError("the training set is empty")
            train_loss = {k: v / n_batches for k, v in totals.items()}
            history["train_loss"].append(train_loss)
            info = f"loss {train_loss.get('loss', float('nan')):.4g}"

            if val_data is not None:
                val_loss = _validate(model, val_data, batch_size, device)
                history["val_loss"].append(val_loss)
                info += f" val {val_loss:.4g}"
                if history["best_val_loss"] is None or val_loss < history["best_val_loss"]:
                    history["best_val_loss"], history["best_epoch"] = val_loss, epoch
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            history["epochs_run"] = epoch + 1
            history["steps"] = step
            history["seconds"] = time.perf_counter() - started
            bar.update(task, advance=1, info=info)

            stop = max_steps is not None and step >= max_steps
            if (early_stopping_patience is not None and history["best_epoch"] is not None
                    and epoch - history["best_epoch"] >= early_stopping_patience):
                history["stopped_early"] = stop = True
            if last_path is not None:
                save_checkpoint(last_path, model, training={
                    "optimizers": [opt.state_dict() for opt in optimizers],
                    "history": copy.deepcopy(history),
                    "best_state": best_state,
                })
            if stop:
                break

    if best_state is not None and early_stopping_patience is not None:
        load_state_into(model, best_state, source="best_state")
    return history


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


@torch.no_grad()
def fit_closed_form(model, train_data, val_data=None, *, solve: Callable[[torch.Tensor, int], None],
                    loss: Callable[[torch.Tensor], torch.Tensor], epochs: int = 1,
                    max_steps: int | None = None, batch_size: int = 16, num_workers: int = 0,
                    device: str | torch.device = "auto", seed: int = 0,
                    out_dir: str | Path | None = None, resume: bool = False,
                    early_stopping_patience: int | None = None, grad_clip: float | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """The loop's bookkeeping for a closed-form model, with :func:`fit`'s options and history.

    ``solve(images, seed)`` fits the model on all training images at once (a CPU tensor,
    see :func:`collect_images`); ``loss(images)`` is the per-sample loss (N,) that the
    history reports for the training and validation images. There are no iterations:
    ``epochs``, ``resume``, ``early_stopping_patience`` and ``grad_clip`` are accepted so
    one config trains any model, and have no effect. With ``out_dir`` the fitted model is
    written to ``last.ckpt`` like an iterative run's last epoch.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    device = resolve_device(device)
    seed_everything(seed)
    started = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"fit {model.registry_name}", total=1, info="")
        images = collect_images(train_data, batch_size=batch_size, max_steps=max_steps,
                                num_workers=num_workers)
        model.to("cpu")  # the linear algebra runs on the CPU (numpy/scipy/scikit-learn)
        solve(images, seed)
        model.to(device)

        def mean_loss(data) -> float:
            values = [loss(chunk.to(device)).double().sum().item()
                      for chunk in data.split(max(1, batch_size))]
            return sum(values) / len(data)

        was_training = model.training
        model.eval()
        train_loss = mean_loss(images)
        history: dict[str, Any] = {
            "train_loss": [{"loss": train_loss}], "val_loss": [], "best_epoch": None,
            "best_val_loss": None, "epochs_run": 1,
            "steps": math.ceil(len(images) / max(1, batch_size)), "seconds": 0.0,
            "stopped_early": False,
        }
        info = f"loss {train_loss:.4g}"
        if val_data is not None:
            val_loss = mean_loss(collect_images(val_data, batch_size=batch_size,
                                                num_workers=num_workers))
            history.update(val_loss=[val_loss], best_epoch=0, best_val_loss=val_loss)
            info += f" val {val_loss:.4g}"
        model.train(was_training)
        history["seconds"] = time.perf_counter() - started
        bar.update(task, advance=1, info=info)
    for value in [train_loss, *history["val_loss"]]:
        if not math.isfinite(value):
            raise TrainingError(f"closed-form fit of {type(model).__name__} gave a loss of {value}: "
                                "check the input data for NaN/inf values")
    if out_dir is not None:
        save_checkpoint(Path(out_dir) / LAST, model,
                        training={"optimizers": [], "history": copy.deepcopy(history),
                                  "best_state": None})
    return history


@torch.no_grad()
def _validate(model, val_data, batch_size: int, device: torch.device) -> float:
    model.eval()
    total, n = 0.0, 0
    for batch in as_loader(val_data, batch_size=batch_size):
        batch = _to_device(batch, device)
        loss = model.validation_step(batch)["loss"]
        count = len(batch["image"])
        total += float(loss) * count
        n += count
    model.train()
    return total / max(n, 1)
