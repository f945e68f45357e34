"""Where a benchmark's jobs run: in this process one after another, or as tasks on Ray.

A benchmark is a list of :class:`Job` s, one per (detector, category, seed). An executor
calls ``task(job, spec)`` for each and hands every finished row to ``on_row`` (in the
driver, as soon as it is there), so the runner can save it and rebuild the report.

- :class:`LocalExecutor`: in-process and sequential, with a progress bar; what the
  benchmark always did.
- :class:`RayExecutor`: every job is a ``ray.remote`` task on an existing cluster
  (``address="auto"`` or ``"ray://host:10001"``) or on a local Ray it starts
  (``address=None``). A task that dies with its worker (killed, out of memory:
  ``WorkerCrashedError``), raises past ``task`` (``RayTaskError``) or outlives the
  job timeout becomes an error row made by ``on_failure``; the other jobs go on.

Ray is imported only when a :class:`RayExecutor` runs, so ``import anomalykit.benchmark``
works without it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from anomalykit.errors import ConfigError

__all__ = ["EXECUTORS", "Job", "JobTimeout", "LocalExecutor", "RayExecutor", "import_ray",
           "job_time_limit"]

ExecutorName = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")
Row = dict[str, Any]
#: ``task(job, spec) -> row``; it records its own failures as error rows.
Task = Callable[["Job", Any], Row]
#: ``on_failure(job, message) -> row`` for a job whose task never returned.
OnFailure = Callable[["Job", str], Row]
OnRow = Callable[["Job", Row], None]

#: Extra seconds the Ray driver waits past the job timeout before it kills the worker: the
#: task enforces the timeout itself (an error row with a traceback); the kill is the backstop
#: for a task stuck where Python cannot interrupt it (inside a C call).
KILL_GRACE_S = 30.0


@dataclass(frozen=True, order=False)
class Job:
    """One unit of a benchmark: train, evaluate, export and time ``detector`` on ``category``."""

    detector: str
    category: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.detector} / {self.category} / seed {self.seed}"


class JobTimeout(BaseException):
    """A job ran past its time limit.

    A BaseException, so that a detector's or the exporter's ``except Exception`` cannot
    swallow it and carry on past the limit.
    """


@contextlib.contextmanager
def job_time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`JobTimeout` in this thread once ``seconds`` (wall clock) have passed.

    Uses ``SIGALRM``, so it works in a process's main thread on POSIX (the local benchmark
    and Ray's task workers); elsewhere, or with ``seconds=None``, there is no limit.
    """
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise JobTimeout(f"job exceeded the job timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def import_ray() -> Any:
    """``import ray``, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'anomalykit[cluster]'") from None
    return ray


class LocalExecutor:
    """Run the jobs here, one after another, with a progress bar over the jobs."""

    def __init__(self, *, progress: bool = True) -> None:
        self.progress = progress

    def run(self, jobs: Sequence[Job], task: Task, spec: Any, on_row: OnRow,
            on_failure: OnFailure) -> None:
        """``task`` handles its own exceptions; a KeyboardInterrupt stops the benchmark."""
        import gc

        from anomalykit.training.progress import progress_bar

        with progress_bar(self.progress) as bar:
            overall = bar.add_task("benchmark", total=len(jobs), info="")
            for job in jobs:
                bar.update(overall, info=job.label)
                on_row(job, task(job, spec))
                bar.advance(overall)
                gc.collect()  # free the finished model before the next one is built


class RayExecutor:
    """Run every job as a Ray task; rows come back to the driver as the tasks finish.

    Args:
        address: ``None`` starts a local Ray with ``num_cpus`` CPUs (shut down again at
            the end); ``"auto"`` or ``"ray://host:port"`` joins a running cluster. If Ray is
            already initialised in this process (a notebook, a test), that one is used.
        cpus_per_job: CPUs Ray reserves for each task (its ``num_cpus``); tasks run side by
            side as far as the cluster's CPUs allow.
        gpus_per_job: GPUs reserved per task (``num_gpus``; use 1 with ``device=cuda``).
        num_cpus: CPUs of a local Ray (default: all of this machine's).
        job_timeout: Seconds; a task still running :data:`KILL_GRACE_S` after it is
            force-cancelled (its worker killed) and becomes an error row.
        progress: A progress bar over the jobs in the driver.

    Tasks run with ``max_retries=0``: a job that killed its worker (out of memory, say)
    would most likely kill the next one too; it is recorded and a rerun retries it.
    """

    def __init__(self, *, address: str | None = None, cpus_per_job: float = 1.0,
                 gpus_per_job: float = 0.0, num_cpus: int | None = None,
                 job_timeout: float | None = None, progress: bool = True) -> None:
        if cpus_per_job <= 0:
            raise ConfigError(f"cpus per job must be positive, got {cpus_per_job}")
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.gpus_per_job = gpus_per_job
        self.num_cpus = num_cpus
        self.job_timeout = job_timeout
        self.progress = progress

    def describe(self) -> str:
        """For the report header."""
        where = self.address or "a local Ray instance"
        return f"ray ({where}; {self.cpus_per_job:g} CPU(s) per job)"

    def run(self, jobs: Sequence[Job], task: Task, spec: Any, on_row: OnRow,
            on_failure: OnFailure) -> None:
        ray = import_ray()
        from anomalykit.training.progress import progress_bar

        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, include_dashboard=False,
                         num_cpus=self.num_cpus if self.address is None else None)
            except ConnectionError as exc:  # no cluster at that address
                raise ConfigError(f"cannot reach the Ray cluster at {self.address!r}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
                                  ) from None
        remote = ray.remote(task).options(num_cpus=self.cpus_per_job,
                                          num_gpus=self.gpus_per_job, max_retries=0)
        # Submit no more tasks than can run at once, so a task's clock (for the timeout
        # backstop) starts about when it starts, not while it waits in Ray's queue.
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        capacity = max(1, int(total_cpus // self.cpus_per_job))
        waiting: deque[Job] = deque(jobs)
        running: dict[Any, tuple[Job, float]] = {}
        try:
            with progress_bar(self.progress) as bar:
                overall = bar.add_task("benchmark (ray)", total=len(jobs), info="")
                while waiting or running:
                    while waiting and len(running) < capacity:
                        job = waiting.popleft()
                        running[remote.remote(job, spec)] = (job, time.monotonic())
                    bar.update(overall, info=f"{len(running)} running")
                    done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                    for ref in done:
                        job, _ = running.pop(ref)
                        on_row(job, self._result(ray, ref, job, on_failure))
                        bar.advance(overall)
                    for ref, (job, started) in list(running.items()):
                        if (self.job_timeout is not None
                                and time.monotonic() - started > self.job_timeout + KILL_GRACE_S):
                            ray.cancel(ref, force=True)
                            del running[ref]
                            on_row(job, on_failure(job, f"JobTimeout: killed after the job "
                                                        f"timeout of {self.job_timeout:g} s"))
                            bar.advance(overall)
        finally:
            for ref in running:  # Ctrl-C or a failing on_row: don't leave work behind
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    @staticmethod
    def _result(ray: Any, ref: Any, job: Job, on_failure: OnFailure) -> Row:
        """The task's row, or an error row when the task or its worker failed."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # raised past the task's own handling
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            text = str(cause).strip().splitlines()
            message = f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__
            return on_failure(job, message)
        except ray.exceptions.RayError as exc:  # worker crashed or killed, node lost, ...
            text = str(exc).strip().splitlines()
            return on_failure(job, f"{type(exc).__name__}: {text[0] if text else 'no details'}")
