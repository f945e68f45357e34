"""Folder watcher: score every image a camera drops into a folder, record it, sort it.

    python -m anomalykit.serve.watcher bottle.onnx /data/line3/inbox [--out DIR] [--once]

Layout (``out_dir`` defaults to the inbox itself, so one folder holds everything)::

    inbox/frame_001.png        new frames, as the camera writes them
    out/results.csv            one row per frame (:data:`COLUMNS`)
    out/ok/  out/ng/           frames after scoring, by the model's own label (its threshold)
    out/error/                 frames that could not be decoded or scored (the row says why)

Only regular files directly inside the inbox are looked at, never subfolders, so ``ok/``,
``ng/`` and ``error/`` inside the inbox are never rescanned. Names starting with ``.`` and
names without an image extension (``x.tmp``, ``x.png.part``: a camera writing then renaming)
are left alone. A file is read only once its size and mtime have stayed the same for
``settle_s`` seconds, so a frame still being written is not read half-way.

Crash safety. For each batch: read the bytes and hash them (sha256), score, append the
rows to ``results.csv`` in one write and fsync it, then rename each file into ``ok/``/``ng/``
/``error/`` (atomic on one filesystem) and fsync the folders. A crash

* before the fsync: the file is still in the inbox and has no complete row; a row cut short
  is cut off ``results.csv`` on the next start and the file is scored again;
* after the fsync, before the rename: on the next start the file's (name, sha256, mtime_ns)
  is found in ``results.csv``, so it is moved where its row says, without being scored again;
* after the rename: nothing is left to do.

So every frame ends with exactly one row and in exactly one folder. A name already taken in
``ok/``/``ng/`` (a camera that restarts its counter) gets a suffix (``frame__1.png``);
nothing is overwritten. One watcher per inbox: a second one is refused (a lock file).
SIGTERM or Ctrl-C lets the batch in hand finish (rows and moves), then the watcher exits.

Torch-free: numpy, OpenCV and onnxruntime, through ``anomalykit.export.runtime``; copied beside
``runtime.py`` it also runs without the anomalykit package.
"""

from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

try:
    from anomalykit.export.runtime import OnnxDetector, decode_image, group_by_shape
except ModuleNotFoundError as exc:  # deployed without the package: runtime.py copied beside this file
    if not (exc.name or "").startswith("anomalykit"):  # a missing cv2 or numpy: say so
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runtime import OnnxDetector, decode_image, group_by_shape  # type: ignore[no-redef]

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; run one watcher per inbox by hand
    fcntl = None  # type: ignore[assignment]

__all__ = ["COLUMNS", "IMAGE_EXTENSIONS", "FolderWatcher", "main", "watch_folder"]

logger = logging.getLogger("anomalykit.watcher")

# The same list as anomalykit.data.io.IMAGE_EXTENSIONS (a test keeps them equal); repeated
# here because anomalykit.data imports torch and this module must not.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
COLUMNS: tuple[str, ...] = ("time", "file", "sha256", "size", "mtime_ns", "score",
                            "normalized_score", "label", "verdict", "moved_to", "error")
VERDICTS: tuple[str, ...] = ("ok", "ng", "error")
RESULTS_NAME = "results.csv"
LOCK_NAME = ".anomalykit-watcher.lock"


def is_candidate(name: str) -> bool:
    """A file name the watcher scores: an image extension, not hidden (``.x``), not temporary."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _fsync_dir(path: Path) -> None:
    """Make renames and new files in ``path`` durable (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    # Not anomalykit.atomic.sha256_file: this file also runs copied beside runtime.py alone.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _move(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (free); across filesystems copy + fsync + rename + delete."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # Another filesystem: copy to a hidden name in the target folder, then rename it, so the
    # target name never holds half a file. A crash before the unlink leaves both copies; the
    # next start sees the target's sha256 equals the row's and only deletes the source.
    partial = target.with_name(f".{target.name}.part")
    with open(source, "rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    shutil.copystat(source, partial)
    os.rename(partial, target)
    _fsync_dir(target.parent)
    os.unlink(source)


def _truncate_partial_row(path: Path) -> None:
    """Cut off bytes after the last newline: a row cut short by a crash (its file is rescored)."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - 4096)
            f.seek(start)
            block = f.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep < end:
            logger.warning("%s: dropping %d bytes of a row cut short by a crash", path, end - keep)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


@dataclass
class _Seen:
    """A candidate file's last (size, mtime_ns) and since when (monotonic s) it has not changed."""

    stat: tuple[int, int]
    since: float


@dataclass
class _Frame:
    """One file's bytes and identity, read once for hashing and decoding."""

    path: Path
    data: bytes
    sha256: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.path.name, self.sha256, self.mtime_ns)


class FolderWatcher:
    """Scores the settled images of ``inbox`` and sorts them into ``out_dir``; see the module doc.

    ``poll()`` does one pass (scan, then score and move every settled file, ``batch_size`` per
    onnxruntime call); ``run()`` polls until stopped. Call ``close()`` (or use ``with``) to
    release the CSV and the inbox lock.
    """

    def __init__(self, detector: OnnxDetector, inbox: str | os.PathLike, *,
                 out_dir: str | os.PathLike | None = None, settle_s: float = 1.0,
                 batch_size: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        self.detector = detector
        self.inbox = Path(inbox)
        self.out_dir = Path(out_dir) if out_dir is not None else self.inbox
        if not self.inbox.is_dir():
            raise FileNotFoundError(f"inbox folder {self.inbox} does not exist")
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0 seconds, got {settle_s}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.folders = {verdict: self.out_dir / verdict for verdict in VERDICTS}
        inbox_real = self.inbox.resolve()
        if any(inbox_real == folder.resolve() for folder in self.folders.values()):
            raise ValueError(f"inbox {self.inbox} is one of the output folders ok/ng/error "
                             f"of {self.out_dir}; choose another --out")
        self.settle_s = float(settle_s)
        self.batch_size = int(batch_size)
        self.clock = clock
        self.results_path = self.out_dir / RESULTS_NAME
        self._seen: dict[str, _Seen] = {}
        self._move_failed: set[str] = set()  # names whose row is written but whose move failed
        self._lock_fd = self._lock_inbox()
        try:
            for folder in self.folders.values():
                folder.mkdir(parents=True, exist_ok=True)
            self._csv_fd = self._open_results()
            # Rows whose file is still in the inbox: crashed between the row and the move.
            self._recorded = self._load_recorded({entry.name for entry in os.scandir(self.inbox)})
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- setup ------------------------------------------------------------------------------

    def _lock_inbox(self) -> int:
        fd = os.open(self.inbox / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"another watcher is already running on {self.inbox} "
                                 f"(it holds {self.inbox / LOCK_NAME})") from None
        return fd

    def _open_results(self) -> int:
        """Repair ``results.csv`` (partial last row), check its header, open it for appending."""
        header = ",".join(COLUMNS) + "\n"
        if self.results_path.exists():
            _truncate_partial_row(self.results_path)
            with open(self.results_path, encoding="utf-8", newline="") as f:
                first = f.readline()
            if first and first != header.replace("\n", "\r\n") and first != header:
                raise ValueError(f"{self.results_path} is not a watcher results file (its header "
                                 f"is {first.strip()!r}, expected {header.strip()!r}); "
                                 "move it away or choose another --out")
        fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size == 0:
            self._write(fd, header)
            _fsync_dir(self.out_dir)
        return fd

    def _load_recorded(self, names_in_inbox: set[str]) -> dict[tuple[str, str, int], str]:
        """(file, sha256, mtime_ns) -> moved_to for rows whose file name is still in the inbox.

        Only those can need finishing, so memory stays small however long the CSV grows.
        """
        recorded: dict[tuple[str, str, int], str] = {}
        with open(self.results_path, encoding="utf-8", newline="") as f:
            for line_number, row in enumerate(csv.DictReader(f), start=2):
                if row.get("file") not in names_in_inbox:
                    continue
                try:
                    recorded[(row["file"], row["sha256"], int(row["mtime_ns"]))] = row["moved_to"]
                except (KeyError, TypeError, ValueError):
                    logger.warning("%s line %d is malformed; ignored", self.results_path, line_number)
        return recorded

    def close(self) -> None:
        for name in ("_csv_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> FolderWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- scanning -----------------------------------------------------------------------------

    def settled_files(self) -> list[Path]:
        """Candidate files whose (size, mtime_ns) has not changed for ``settle_s``, oldest first."""
        now = self.clock()
        ready: list[tuple[int, str]] = []
        present: set[str] = set()
        for entry in os.scandir(self.inbox):
            if not is_candidate(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # renamed away between listing and stat
                continue
            present.add(entry.name)
            key = (stat.st_size, stat.st_mtime_ns)
            seen = self._seen.get(entry.name)
            if seen is None or seen.stat != key:
                seen = self._seen[entry.name] = _Seen(key, now)
            if now - seen.since >= self.settle_s:
                ready.append((stat.st_mtime_ns, entry.name))
        for name in set(self._seen) - present:
            del self._seen[name]
            self._move_failed.discard(name)
        return [self.inbox / name for _, name in sorted(ready)]

    @property
    def waiting(self) -> int:
        """Candidate files seen in the inbox and not handled yet (failed moves not counted)."""
        return len(set(self._seen) - self._move_failed)

    # -- processing -----------------------------------------------------------------------------

    def poll(self, stop: threading.Event | None = None) -> int:
        """One pass: handle every settled file, ``batch_size`` at a time. Returns how many.

        ``stop`` is checked between batches: a batch once started is always finished.
        """
        paths = self.settled_files()
        handled = 0
        for start in range(0, len(paths), self.batch_size):
            if stop is not None and stop.is_set():
                break
            handled += self.process(paths[start:start + self.batch_size])
        return handled

    def process(self, paths: Sequence[Path]) -> int:
        """Score ``paths`` (one onnxruntime call per image size), write their rows, move them."""
        frames: list[_Frame] = []
        for path in paths:
            frame = self._read(path)
            if frame is None:
                continue
            if frame.key in self._recorded:
                self._finish_recorded(frame)
            else:
                frames.append(frame)
        if not frames:
            return 0
        rows = self._score(frames)
        taken: set[Path] = set()
        targets = [self._free_target(row["verdict"], frame.path.name, taken)
                   for frame, row in zip(frames, rows, strict=True)]
        for row, target in zip(rows, targets, strict=True):
            row["moved_to"] = target.relative_to(self.out_dir).as_posix()
        # The rows are durable before any file leaves the inbox: see the module docstring.
        self._append(rows)
        for frame, row in zip(frames, rows, strict=True):
            self._recorded[frame.key] = row["moved_to"]
        for frame, row, target in zip(frames, rows, targets, strict=True):
            self._move_recorded(frame, target)
            logger.info("%s %s score=%s -> %s%s", frame.path.name, row["verdict"], row["score"] or "-",
                        row["moved_to"], f" ({row['error']})" if row["error"] else "")
        self._sync_folders()
        return len(frames)

    def _read(self, path: Path) -> _Frame | None:
        """The file's bytes if it is still the settled version; None if it vanished or changed."""
        seen = self._seen.get(path.name)
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                data = f.read()
                after = os.fstat(f.fileno())
        except FileNotFoundError:
            self._seen.pop(path.name, None)
            return None
        except OSError as exc:  # e.g. still locked by the writer on Windows: try again later
            logger.warning("cannot read %s yet: %s", path, exc)
            self._seen.pop(path.name, None)
            return None
        stat = (after.st_size, after.st_mtime_ns)
        if (before.st_size, before.st_mtime_ns) != stat or len(data) != after.st_size or (
                seen is not None and seen.stat != stat):
            self._seen.pop(path.name, None)  # written to again: wait until it settles anew
            return None
        return _Frame(path, data, hashlib.sha256(data).hexdigest(), after.st_size, after.st_mtime_ns)

    def _score(self, frames: Sequence[_Frame]) -> list[dict[str, Any]]:
        """One row per frame (COLUMNS but moved_to); undecodable frames get verdict ``error``."""
        rows: list[dict[str, Any]] = []
        images: dict[int, np.ndarray] = {}
        for i, frame in enumerate(frames):
            rows.append({"time": "", "file": frame.path.name, "sha256": frame.sha256,
                         "size": frame.size, "mtime_ns": frame.mtime_ns, "score": "",
                         "normalized_score": "", "label": "", "verdict": "error", "moved_to": "",
                         "error": ""})
            try:
                images[i] = decode_image(frame.data, source=f"image {frame.path.name}")
            except ValueError as exc:
                rows[i]["error"] = str(exc)
        order = list(images)
        for group in group_by_shape([images[i] for i in order]):
            indices = [order[j] for j in group]
            try:
                out = self.detector.predict(np.stack([images[i] for i in indices]))
            except Exception as exc:  # noqa: BLE001 - one bad frame size must not stop the line
                for i in indices:
                    rows[i]["error"] = f"model failed: {str(exc).strip().splitlines()[0]}"
                continue
            for j, i in enumerate(indices):
                label = int(out["label"][j])
                rows[i].update(score=repr(float(out["score"][j])),
                               normalized_score=repr(float(out["normalized_score"][j])),
                               label=label, verdict="ng" if label else "ok")
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        for row in rows:
            row["time"] = now
        return rows

    def _free_target(self, verdict: str, name: str, taken: set[Path]) -> Path:
        """``<verdict>/<name>``, or ``<stem>__<n><ext>`` when that name is taken: never overwrite."""
        folder = self.folders[verdict]
        stem, ext = os.path.splitext(name)
        target, n = folder / name, 0
        while target in taken or os.path.lexists(target):
            n += 1
            target = folder / f"{stem}__{n}{ext}"
        taken.add(target)
        return target

    def _finish_recorded(self, frame: _Frame) -> None:
        """A file that already has its row (a crash came before its move): move it, no rescoring."""
        target = self.out_dir / self._recorded[frame.key]
        if os.path.lexists(target):
            if target.is_file() and _sha256_file(target) == frame.sha256:
                # Copied across filesystems before the crash; only the deletion was left to do.
                frame.path.unlink()
                self._recorded.pop(frame.key)
                self._seen.pop(frame.path.name, None)
                logger.info("%s was already recorded and copied to %s; removed from the inbox",
                            frame.path.name, target)
                return
            verdict = target.parent.name if target.parent.name in self.folders else "error"
            new_target = self._free_target(verdict, frame.path.name, set())
            logger.warning("%s: its recorded place %s is taken by another file; moving it to %s "
                           "(results.csv still names %s)", frame.path.name, target, new_target, target)
            target = new_target
        self._move_recorded(frame, target)
        self._sync_folders()
        logger.info("%s was already recorded (a restart after a crash); moved to %s without "
                    "scoring it again", frame.path.name, target.relative_to(self.out_dir).as_posix())

    def _move_recorded(self, frame: _Frame, target: Path) -> None:
        try:
            _move(frame.path, target)
        except OSError as exc:
            # Its row is written: keep the key, so the next pass retries the move, never the score.
            logger.error("cannot move %s to %s (will retry): %s", frame.path, target, exc)
            self._move_failed.add(frame.path.name)
            return
        self._recorded.pop(frame.key, None)
        self._seen.pop(frame.path.name, None)
        self._move_failed.discard(frame.path.name)

    def _append(self, rows: Sequence[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writerows(rows)
        self._write(self._csv_fd, buffer.getvalue())

    @staticmethod
    def _write(fd: int, text: str) -> None:
        """Append ``text`` and fsync: one write, so rows are whole unless the machine dies."""
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)

    def _sync_folders(self) -> None:
        for folder in (self.inbox, *self.folders.values()):
            _fsync_dir(folder)

    def run(self, *, poll_s: float = 0.5, once: bool = False,
            stop: threading.Event | None = None) -> int:
        """Poll every ``poll_s`` seconds until ``stop`` is set; returns the files handled.

        ``once``: handle what the inbox holds (waiting for it to settle), then return.
        """
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        stop = stop or threading.Event()
        handled = 0
        while not stop.is_set():
            handled += self.poll(stop)
            if once and self.waiting == 0:
                break
            stop.wait(poll_s)
        return handled


def watch_folder(model: str | os.PathLike | OnnxDetector, inbox: str | os.PathLike, *,
                 out_dir: str | os.PathLike | None = None, poll_s: float = 0.5,
                 settle_s: float = 1.0, batch_size: int = 8, once: bool = False,
                 stop_event: threading.Event | None = None, device: str = "auto",
                 threads: int | None = None) -> int:
    """Watch ``inbox`` with an exported model (a path or an :class:`OnnxDetector`).

    Returns the number of files handled when ``stop_event`` is set, or, with ``once``, when the
    inbox is empty. See the module docstring for the layout and the crash guarantees.
    """
    detector = model if isinstance(model, OnnxDetector) else OnnxDetector(model, device=device,
                                                                         threads=threads)
    with FolderWatcher(detector, inbox, out_dir=out_dir, settle_s=settle_s,
                       batch_size=batch_size) as watcher:
        logger.info("watching %s -> %s (model %s, threshold %s)", watcher.inbox, watcher.out_dir,
                    detector.path.name, detector.threshold)
        return watcher.run(poll_s=poll_s, once=once, stop=stop_event)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalykit watch",
        description="Score each image dropped into INBOX, append a row to OUT/results.csv and "
                    "move the image to OUT/ok, OUT/ng or OUT/error.")
    parser.add_argument("model", help="ONNX file written by anomalykit export")
    parser.add_argument("inbox", help="folder the camera writes frames into")
    parser.add_argument("--out", default=None,
                        help="folder for results.csv, ok/, ng/, error/ (default: the inbox)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between scans")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds a file's size and mtime must stay unchanged before it is read")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="files of the same size scored per onnxruntime call")
    parser.add_argument("--once", action="store_true",
                        help="handle the files in the inbox now, then exit")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 done, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping after the batch in hand", signum)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        handled = watch_folder(args.model, args.inbox, out_dir=args.out, poll_s=args.poll,
                               settle_s=args.settle, batch_size=args.batch_size, once=args.once,
                               stop_event=stop, device=args.device, threads=args.threads)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped; %d file(s) handled", handled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
