"""Decode-once cache: small arrays (resized images, masks) kept in memory and optionally on disk.

:class:`~anomalykit.data.AnomalyDataset` decodes each full-resolution file once, resizes it
to the network's input size and keeps the ``uint8`` result here, so later epochs only
augment a small cached copy. numpy only: no torch, no OpenCV.

An entry is a dict of named arrays, found by a ``key`` (what was computed: resolved paths,
target size) and checked against a ``stamp`` (``mtime_ns`` and byte size of the source
files, :func:`file_stamp`): a file touched or replaced since is decoded again.

Memory is bounded by ``max_bytes`` (the arrays' ``nbytes``). When an entry does not fit it
is served but not kept, and nothing is evicted: an epoch reads every item once, an access
pattern under which LRU evicts exactly the entries the next epoch needs first (sequential
order: no hit at all), whereas keeping the first entries that fit gives a hit rate of
``max_bytes / total`` with no churn. An entry whose stamp changed is replaced in place.

On disk (``cache_dir``) an entry is one ``.npz`` file named by a hash of its key and holding
its stamp, so a changed source overwrites its own entry instead of leaving an orphan.
Files are written to a temporary name and moved into place with :func:`os.replace`, so
concurrent writers (DataLoader workers, parallel runs) never leave a torn file, and an
unreadable or stale file counts as a miss. The disk cache is not bounded; delete the folder
to clear it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
import zipfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

from anomalykit.atomic import atomic_write

__all__ = ["DEFAULT_CACHE_BYTES", "ImageCache", "file_stamp"]

#: Default memory budget: a full MVTec AD category at 256 px is about 200 MB.
DEFAULT_CACHE_BYTES: int = 2**30

# Bump when what is cached for a key changes (decoder, resize), so old disk entries miss.
_FORMAT = 1
_STAMP = "__stamp__"

Entry = dict[str, np.ndarray]


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(mtime_ns, size)`` of ``path``; raises OSError when it cannot be stat'ed.

    A folder (a ground truth of several mask files) stamps as its newest entry and the total
    size of its files, so editing one of them changes the stamp.
    """
    stat = os.stat(path)
    if not os.path.isdir(path):
        return stat.st_mtime_ns, stat.st_size
    entries = [os.stat(entry.path) for entry in os.scandir(path) if entry.is_file()]
    return (max([stat.st_mtime_ns, *(e.st_mtime_ns for e in entries)]),
            sum(e.st_size for e in entries))


class ImageCache:
    """Bounded in-memory (and optional on-disk) store of decoded arrays.

    Thread-safe. A pickled copy (DataLoader workers under ``spawn``) carries the entries
    held at that moment; forked workers share the parent's entries copy-on-write. Either way
    each worker adds to its own copy only, so entries a worker decodes are lost when it
    exits unless ``cache_dir`` is set.

    Args:
        max_bytes: Memory budget in bytes; ``0`` keeps nothing in memory.
        cache_dir: Folder for ``.npz`` entries (created on first write); ``None`` keeps the
            cache in memory only.

    Attributes:
        hits: Entries served from memory. ``disk_hits``: served from ``cache_dir``.
        misses: Calls of ``load`` (decodes). ``nbytes``: bytes held in memory.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, *,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes is {max_bytes!r}; expected an integer >= 0")
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.hits = self.disk_hits = self.misses = self.nbytes = 0
        self._entries: dict[Hashable, tuple[tuple[int, ...], Entry, int]] = {}
        self._lock = threading.Lock()
        self._warned = False

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"ImageCache({len(self)} entries, {self.nbytes / 2**20:.1f} of "
                f"{self.max_bytes / 2**20:.0f} MiB, cache_dir={self.cache_dir})")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        # Pickling (DataLoader workers under spawn) makes arrays writeable again.
        for _stamp, entry, _size in self._entries.values():
            for array in entry.values():
                array.flags.writeable = False

    def clear(self) -> None:
        """Drop the memory entries (the disk entries stay)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def get(self, key: Hashable, stamp: tuple[int, ...], load: Callable[[], Entry]) -> Entry:
        """The entry of ``key`` if it was stored with ``stamp``, else ``load()`` stored.

        Returned arrays are read-only: they are shared by every later call.
        """
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found[0] == stamp:
                self.hits += 1
                return found[1]
        entry = self._read(key, stamp) if self.cache_dir is not None else None
        if entry is None:
            entry = load()  # outside the lock: decodes on several threads run in parallel
            with self._lock:
                self.misses += 1
            if self.cache_dir is not None:
                self._write(key, stamp, entry)
        else:
            with self._lock:
                self.disk_hits += 1
        for array in entry.values():
            array.flags.writeable = False  # an in-place augmentation would corrupt the cache
        size = sum(array.nbytes for array in entry.values())
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old[2]
            if self.nbytes + size <= self.max_bytes:
                self._entries[key] = (stamp, entry, size)
                self.nbytes += size
        return entry

    # -- disk ------------------------------------------------------------------------------

    def _file(self, key: Hashable) -> Path:
        assert self.cache_dir is not None
        digest = hashlib.sha256(repr((_FORMAT, key)).encode("utf-8")).hexdigest()[:32]
        return self.cache_dir / f"{digest}.npz"

    def _read(self, key: Hashable, stamp: tuple[int, ...]) -> Entry | None:
        path = self._file(key)
        try:
            with np.load(path, allow_pickle=False) as archive:
                if tuple(archive[_STAMP].tolist()) != tuple(stamp):
                    return None
                return {name: archive[name] for name in archive.files if name != _STAMP}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # torn by a crash or foreign: decode again and overwrite it

    def _write(self, key: Hashable, stamp: tuple[int, ...], entry: Entry) -> None:
        assert self.cache_dir is not None
        target = self._file(key)

        def write(temporary: str) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, **{_STAMP: np.asarray(stamp, dtype=np.int64)}, **entry)

        try:
            atomic_write(target, write)
        except OSError as exc:
            # A full or read-only disk must not stop training: serve from memory and say so once.
            if not self._warned:
                self._warned = True
                warnings.warn(f"image cache: cannot write to {self.cache_dir} ({exc}); "
                              "continuing without the disk cache", RuntimeWarning, stacklevel=3)
