"""Progress bars (rich) that stay quiet when asked or when nothing watches.

Under torchrun (data-parallel training) only rank 0 shows bars: the other processes would
print the same bars again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)


def make_progress(enabled: bool = True) -> Progress:
    # Imported here: distributed imports inference, which imports this module.
    from anomalykit.training.distributed import is_main_process

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled or not is_main_process(),
        transient=False,
    )


@contextmanager
def progress_bar(enabled: bool = True):
    """Context manager yielding a started :class:`rich.progress.Progress`."""
    progress = make_progress(enabled)
    with progress:
        yield progress


def track(items: Iterable[T], description: str, *, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar (a thin wrapper so callers need no rich import)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(enabled) as progress:
        task = progress.add_task(description, total=total, info="")
        for item in items:
            yield item
            progress.advance(task)
