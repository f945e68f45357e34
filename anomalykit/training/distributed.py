"""Data-parallel training with ``torchrun``: one process per GPU (or CPU worker), one loop.

Launch the same command under ``torchrun`` and :func:`anomalykit.training.fit` trains
data-parallel::

    torchrun --nproc-per-node 2 -m anomalykit train ae --root DATA --category bottle --out runs/ae
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -m anomalykit train ...

torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with
``WORLD_SIZE`` > 1 the loop (see :class:`DataParallel`):

* initialises the process group once (``nccl`` on CUDA, ``gloo`` on the CPU; force one with
  ``fit(distributed_backend=...)``, ``--set train.distributed_backend=gloo`` or the environment
  variable ``ANOMALYKIT_DIST_BACKEND``) and destroys it when the process exits; on CUDA each
  process uses GPU ``LOCAL_RANK`` (``device`` auto/cuda/cuda:N all mean "this process's GPU");
* gives each process its shard of every epoch's shuffled order (:class:`ShardSampler`, a
  ``DistributedSampler`` drawing the single-process loop's permutation, ``seed + epoch``), so
  two processes with batch ``b`` see, step by step, exactly the images one process with batch
  ``2b`` sees; an uneven last shard is padded by repeating images, as DistributedSampler does;
* starts every process from rank 0's weights and wraps the model in
  ``DistributedDataParallel`` (its ``training_step`` runs inside DDP's forward, so gradients
  are averaged during backward; ``static_graph=True`` copes with parameters a step never uses,
  such as a VQ-VAE's prior). Manually optimised models (GANs: several optimizers stepped inside
  ``training_step``) are not wrapped: each optimizer averages the gradients across processes
  just before it steps (a step pre-hook), which gives the same update as DDP for any number of
  backward passes per step. After the fit's first step rank 0's weights are copied to all once
  more: layers that initialise themselves from their first batch (ActNorm in the flows) saw a
  different batch on each process;
* averages the logged losses across processes (every step, before backward: a non-finite loss
  on any process stops every process with the same error instead of a deadlock), computes the
  validation loss on a shard per process and sums it across processes, so the early-stopping
  decision is the same everywhere; buffers (BatchNorm statistics) are copied from rank 0 after
  every epoch;
* lets rank 0 alone write ``last.ckpt`` (and the pipeline's ``model.ckpt``), pictures and
  progress bars; every rank reads the same ``last.ckpt`` on ``--resume`` (on several machines
  the run folder must be on a shared file system).

Batch semantics: ``batch_size`` is per process, as in PyTorch DDP: 2 processes x batch 8 is a
global batch of 16. The learning rate is NOT scaled with the number of processes; scale it
yourself (``--set model.lr=...``) if you keep the per-process batch and add processes.

BatchNorm: with ``sync_batchnorm=True`` (the default) and CUDA, BatchNorm layers become
``SyncBatchNorm`` during the fit (statistics over the global batch, as one process would compute
them) and are turned back into their original classes afterwards. PyTorch's SyncBatchNorm runs
on GPUs only, so on the CPU (gloo) each process normalises with its own shard's statistics.

Random numbers inside ``training_step`` (noise, dropout, a GAN's z) are seeded with
``seed + epoch + rank * RANK_SEED_STRIDE`` so processes do not draw identical noise for their
different images; the data order does not depend on it.

Closed-form models (PCA, GMM, PaDiM, PatchCore) solve on every process (the same solve on the
same images) and then take rank 0's state, so all processes hold the same model; this costs no
communication besides that one broadcast, and no speed-up either.

Checked (2 CPU processes, gloo, 32 px, 2 steps): every registered detector (ae, ae_ssim, vae,
riad, draem, fastflow, differnet, diffusion with its EMA, pixelcnn, the GANs ganomaly, fanogan,
anogan, and the closed-form padim, patchcore, pca) and the VQ-VAE with its PixelCNN prior
(trained in ``on_fit_end``) end with identical weights on both processes. The CUDA path (nccl,
SyncBatchNorm) has not been run: no GPU was available when it was written.

Limits: a model whose ``training_step`` steps an optimizer on some processes and not others
(a data-dependent decision), or uses other parameters from one step to the next, would stop
with an error from DDP or deadlock; none in the toolkit does. A DataLoader cannot be
sharded by the loop: pass a Dataset (or a tensor) as training data. If one process fails,
torchrun stops the others.

With ``WORLD_SIZE`` unset or 1 nothing here runs: no process group, no wrapper, the loop is
exactly the single-process one.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from anomalykit.errors import ConfigError
from anomalykit.training.inference import as_loader

ENV_BACKEND = "ANOMALYKIT_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")
# Per-process offset of the step-level random seed (see the module docstring).
RANK_SEED_STRIDE = 1_000_003


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def world_size() -> int:
    """Number of processes of this run: the process group's, else ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank (0 when not launched by torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on the one process that writes files and shows progress (rank 0)."""
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or the like) started this process as one of several."""
    return world_size() > 1


def init_process_group(device: torch.device, backend: str | None = None) -> torch.device:
    """Join the run's process group once; returns this process's device.

    ``backend``: None = ``ANOMALYKIT_DIST_BACKEND`` if set, else ``nccl`` on CUDA and ``gloo``
    on the CPU. On CUDA the device becomes ``cuda:LOCAL_RANK`` (torchrun starts one process per
    GPU). The group is destroyed when the process exits.
    """
    backend = backend or os.environ.get(ENV_BACKEND) or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise ConfigError(f"distributed backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed backend nccl needs CUDA devices; use gloo on the CPU")
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank()} needs GPU {local_rank()}, but "
                              f"{torch.cuda.device_count()} GPU(s) are visible: start at most one "
                              "process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if name not in os.environ:
                raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {name} is not set: "
                                  "launch data-parallel training with torchrun")
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (in place)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64; the same result everywhere)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def as_dataset(data: Any, what: str) -> Dataset:
    """A Dataset from what ``fit`` accepts, for sharding; a DataLoader cannot be sharded."""
    if isinstance(data, DataLoader):
        raise ConfigError(f"data-parallel training shards the {what} data itself: pass a Dataset "
                          "or a tensor, not a DataLoader")
    return as_loader(data, batch_size=1).dataset


class ShardSampler(DistributedSampler):
    """DistributedSampler whose permutation is the single-process loop's one.

    The loop shuffles with ``DataLoader(shuffle=True, generator=Generator(seed + epoch))``; the
    DataLoader draws one number from the generator (its workers' base seed) before the
    sampler's ``randperm``. Built into a DataLoader with that same generator, this sampler
    draws the same permutation after the same draw, then takes every ``world``-th index from
    ``rank`` (padded to a multiple of ``world`` like DistributedSampler). So with per-process
    batch ``b``, the processes' k-th batches together are the single process's k-th batch of
    size ``world * b``.
    """

    def __init__(self, dataset: Dataset, generator: torch.Generator, *, num_replicas: int,
                 rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True)
        self.generator = generator

    def __iter__(self):
        indices = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        padding = self.total_size - len(indices)
        indices += (indices * (padding // max(len(indices), 1) + 1))[:padding]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


class _TrainingStep(nn.Module):
    """Runs ``model.training_step`` as ``forward``, so DistributedDataParallel sees the step
    (DDP averages gradients only for what runs inside its own forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.model.training_step(batch)


_BATCHNORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _swap_batchnorm(model: nn.Module, make) -> int:
    """Replace each BatchNorm child ``m`` by ``make(m)`` (sharing its parameters and buffers)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                new.weight, new.bias = child.weight, child.bias
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
                new.train(child.training)
                setattr(parent, name, new)
                count += 1
    return count


def to_sync_batchnorm(model: nn.Module) -> list[type]:
    """BatchNorm{1,2,3}d -> SyncBatchNorm in place; returns the original classes, in module
    order, for :func:`from_sync_batchnorm`."""
    originals: list[type] = []

    def make(module):
        if type(module) not in _BATCHNORM_CLASSES:
            return None
        originals.append(type(module))
        return nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats).to(
            module.running_mean.device if module.running_mean is not None else "cpu")

    _swap_batchnorm(model, make)
    return originals


def from_sync_batchnorm(model: nn.Module, originals: list[type]) -> None:
    """Undo :func:`to_sync_batchnorm`: the model saved and exported has plain BatchNorm."""
    remaining = list(originals)

    def make(module):
        if type(module) is not nn.SyncBatchNorm or not remaining:
            return None
        cls = remaining.pop(0)
        return cls(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats)

    _swap_batchnorm(model, make)


class DataParallel:
    """The data-parallel side of one :func:`anomalykit.training.fit` (world size > 1).

    Created by :func:`setup`; the loop asks it for this process's device, its shard of the
    data, the wrapped step, and cross-process sums. See the module docstring.
    """

    def __init__(self, device: torch.device, *, sync_batchnorm: bool) -> None:
        self.device = device
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.sync_batchnorm = sync_batchnorm
        self._ddp: nn.Module | None = None
        self._hooks: list[Any] = []
        self._batchnorm: list[type] = []

    # -- the model ----------------------------------------------------------------------------
    def wrap(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]):
        """Start the fit: same state on every process, then the step function to call.

        Returns ``step(batch, *optimizers)``: DDP's forward around ``training_step`` for
        automatically optimised models with trainable parameters; otherwise
        ``model.training_step`` itself, with every optimizer averaging its gradients across
        processes right before it steps.
        """
        if self.sync_batchnorm and self.device.type == "cuda":
            self._batchnorm = to_sync_batchnorm(model)
        broadcast_state(model)
        trainable = any(p.requires_grad for p in model.parameters())
        if trainable and not model.manual_optimization:
            self._ddp = nn.parallel.DistributedDataParallel(
                _TrainingStep(model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Models may hold parameters that a step does not use (a VQ-VAE's prior, trained
                # after the fit). A static graph finds them in the first step, once, where
                # find_unused_parameters would walk the autograd graph at every step; it needs
                # the same parameters used at every step, which every model here does.
                static_graph=True)
            return self._ddp
        for optimizer in optimizers:
            self._hooks.append(optimizer.register_step_pre_hook(self._average_gradients))
        return model.training_step

    def _average_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def after_first_step(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere once more, after the fit's first step.

        Some layers initialise parameters from their first batch (ActNorm's data-dependent
        initialisation in the flows); each process saw another batch, and DDP only averages
        gradients, so without this the processes would train diverging copies.
        """
        broadcast_state(model)

    def train(self, model: nn.Module) -> None:
        (self._ddp if self._ddp is not None else model).train()

    def end_of_epoch(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere, before validation and saving."""
        with torch.no_grad():
            for tensor in model.buffers():
                dist.broadcast(tensor.data, src=0)

    def finish(self, model: nn.Module) -> None:
        """End of the fit: drop the wrapper and hooks, restore plain BatchNorm; returns once
        every process got here (so rank 0 has written its files)."""
        dist.barrier()
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._ddp = [], None
        if self._batchnorm:
            from_sync_batchnorm(model, self._batchnorm)
            self._batchnorm = []

    # -- the data -----------------------------------------------------------------------------
    def train_loader(self, data: Any, *, batch_size: int, generator: torch.Generator,
                     epoch: int, num_workers: int) -> DataLoader:
        """This process's shard of the epoch's shuffled order (see :class:`ShardSampler`)."""
        sampler = ShardSampler(as_dataset(data, "training"), generator, num_replicas=self.world,
                               rank=self.rank)
        sampler.set_epoch(epoch)
        return DataLoader(sampler.dataset, batch_size=batch_size, sampler=sampler,
                          generator=generator, num_workers=num_workers, drop_last=False)

    def val_shard(self, data: Any) -> Any:
        """Every ``world``-th validation item from ``rank`` (not padded: sums stay exact)."""
        if isinstance(data, DataLoader):
            return None
        dataset = as_dataset(data, "validation")
        return Subset(dataset, range(self.rank, len(dataset), self.world))

    # -- numbers ------------------------------------------------------------------------------
    def mean_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's losses averaged over processes (same keys, same order on every process)."""
        values = [float(v.detach()) for v in losses.values()]
        summed = all_reduce_sum(values, self.device)
        return {k: v / self.world for k, v in zip(losses, summed, strict=True)}

    def sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.device)


def setup(device: torch.device, *, backend: str | None = None,
          sync_batchnorm: bool = True) -> DataParallel | None:
    """The fit's :class:`DataParallel` when launched with several processes, else None."""
    if not launched():
        if backend is not None and backend not in BACKENDS:
            raise ConfigError(f"distributed backend must be one of {', '.join(BACKENDS)}; "
                              f"got {backend!r}")
        return None
    device = init_process_group(device, backend)
    # Wait until every process got here: rank 0 may still be writing the last.ckpt of a
    # previous fit that this one resumes from.
    dist.barrier()
    return DataParallel(device, sync_batchnorm=sync_batchnorm)
