"""anomalykit.serve.watcher on real files, a real onnxruntime session and real subprocesses.

The model is test_deploy's hand-built ONNX file: its map is the per-pixel mean intensity and
its score the map's maximum, so a white frame scores 1 (``ng``) and a black one 0 (``ok``)
against the threshold 0.5 stored in the file.
"""

from __future__ import annotations

import csv
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_deploy import build_model

from anomalykit.export.runtime import OnnxDetector
from anomalykit.serve import watcher
from anomalykit.serve.watcher import COLUMNS, FolderWatcher, main, watch_folder

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # upper bound for a subprocess to start or to handle a file; normally < 2 s
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# Runs the watcher's __main__ with torch and FastAPI made unimportable: a line PC has neither.
LAUNCH = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['fastapi'] = None; "
          "sys.argv = ['watcher', *sys.argv[1:]]; "
          "runpy.run_module('anomalykit.serve.watcher', run_name='__main__')")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "mean.onnx")


@pytest.fixture(scope="module")
def detector(model_path) -> OnnxDetector:
    return OnnxDetector(model_path, device="cpu", threads=1)


class CountingDetector:
    """The real detector, recording the batch size of each onnxruntime call."""

    def __init__(self, inner: OnnxDetector) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.path, self.threshold = inner.path, inner.threshold

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(len(images))
        return self.inner.predict(images)


def png_bytes(value: int, size: tuple[int, int] = (24, 32)) -> bytes:
    ok, encoded = cv2.imencode(".png", np.full((*size, 3), value, np.uint8))
    assert ok
    return encoded.tobytes()


def drop(folder: Path, name: str, data: bytes) -> Path:
    """Write like a camera: a temporary name first, then a rename."""
    tmp = folder / f"{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)
    return folder / name


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def inbox_images(inbox: Path) -> list[str]:
    return [name for name in files(inbox) if watcher.is_candidate(name)]


def test_image_extensions_match_the_data_layer():
    from anomalykit.data.io import IMAGE_EXTENSIONS

    assert watcher.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS


def test_new_files_are_scored_recorded_and_sorted(tmp_path, detector):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    frames = {"white.png": png_bytes(255), "black.png": png_bytes(0), "dark.jpg": png_bytes(60)}
    for name, data in frames.items():
        drop(inbox, name, data)

    handled = watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0)

    assert handled == 3
    assert inbox_images(inbox) == []
    assert files(inbox / "ng") == ["white.png"]
    assert files(inbox / "ok") == ["black.png", "dark.jpg"]
    assert files(inbox / "error") == []
    assert (inbox / "ng" / "white.png").read_bytes() == frames["white.png"]
    rows = {row["file"]: row for row in read_rows(inbox)}
    assert set(rows) == set(frames)
    for name, data in frames.items():
        row = rows[name]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(row["size"]) == len(data)
        assert row["error"] == ""
        assert row["time"].endswith("+00:00")
    white, black, dark = rows["white.png"], rows["black.png"], rows["dark.jpg"]
    assert (white["verdict"], white["label"], white["moved_to"]) == ("ng", "1", "ng/white.png")
    assert (black["verdict"], black["label"], black["moved_to"]) == ("ok", "0", "ok/black.png")
    assert dark["verdict"] == "ok"
    assert float(white["score"]) == pytest.approx(1.0)
    assert float(black["score"]) == pytest.approx(0.0)
    assert float(dark["score"]) == pytest.approx(60 / 255, abs=1e-6)
    # The model's normalized score is 0.5 at its threshold: score - 0.5 + 0.5, clipped.
    assert float(white["normalized_score"]) == pytest.approx(1.0)


def test_separate_out_dir_and_same_size_files_share_one_call(tmp_path, detector):
    inbox, out = tmp_path / "inbox", tmp_path / "results"
    inbox.mkdir()
    for i in range(5):
        drop(inbox, f"big_{i}.png", png_bytes(10 * i, (32, 32)))
    for i in range(2):
        drop(inbox, f"small_{i}.png", png_bytes(250, (16, 16)))
    counting = CountingDetector(detector)

    with FolderWatcher(counting, inbox, out_dir=out, settle_s=0.0, batch_size=8) as w:
        assert w.poll() == 7

    assert sorted(counting.batches) == [2, 5]
    assert len(read_rows(out)) == 7
    assert len(files(out / "ok")) == 5 and len(files(out / "ng")) == 2
    assert not (inbox / "ok").exists() and inbox_images(inbox) == []

    for i in range(5):
        drop(inbox, f"next_{i}.png", png_bytes(0, (32, 32)))
    counting.batches.clear()
    with FolderWatcher(counting, inbox, out_dir=out, settle_s=0.0, batch_size=2) as w:
        assert w.poll() == 5
    assert counting.batches == [2, 2, 1]


def test_a_file_is_read_only_after_it_settles(tmp_path, detector):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    now = [0.0]
    data = png_bytes(255)
    frame = inbox / "slow.png"
    frame.write_bytes(data[: len(data) // 2])  # a camera half-way through writing

    with FolderWatcher(detector, inbox, settle_s=1.0, clock=lambda: now[0]) as w:
        assert w.poll() == 0  # first sighting
        now[0] = 0.6
        assert w.poll() == 0  # unchanged, but not for 1 s yet
        with open(frame, "ab") as f:  # the rest arrives
            f.write(data[len(data) // 2:])
        now[0] = 1.2
        assert w.poll() == 0  # changed since the last look: the wait starts again
        now[0] = 2.0
        assert w.poll() == 0
        now[0] = 2.3
        assert w.poll() == 1

    assert files(inbox / "ng") == ["slow.png"]
    assert files(inbox / "error") == []
    (row,) = read_rows(inbox)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()


def test_hidden_temporary_and_other_files_are_left_alone(tmp_path, detector):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    untouched = {".hidden.png": png_bytes(255), "frame.tmp": png_bytes(255),
                 "frame.png.part": png_bytes(255), "notes.txt": b"not an image"}
    for name, data in untouched.items():
        (inbox / name).write_bytes(data)
    (inbox / "sub" / "nested.png").write_bytes(png_bytes(255))

    assert watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0) == 0
    assert read_rows(inbox) == []
    for name, data in untouched.items():
        assert (inbox / name).read_bytes() == data
    assert (inbox / "sub" / "nested.png").exists()

    os.replace(inbox / "frame.tmp", inbox / "frame.png")  # the camera finishes: rename
    assert watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0) == 1
    assert files(inbox / "ng") == ["frame.png"]


CRASH_BEFORE_MOVE = (
    "import os, sys; from anomalykit.serve import watcher; "
    "watcher._move = lambda source, target: os._exit(17); "  # the power goes after the fsync
    "watcher.watch_folder(sys.argv[1], sys.argv[2], once=True, poll_s=0.01, settle_s=0.0, "
    "device='cpu', threads=1)"
)


def test_restart_after_a_crash_between_row_and_move(tmp_path, model_path, detector):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox, "a.png", png_bytes(255))
    drop(inbox, "b.png", png_bytes(0))
    crashed = subprocess.run([sys.executable, "-c", CRASH_BEFORE_MOVE, str(model_path), str(inbox)],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=WAIT_S)
    assert crashed.returncode == 17, crashed.stderr
    assert sorted(row["file"] for row in read_rows(inbox)) == ["a.png", "b.png"]
    assert inbox_images(inbox) == ["a.png", "b.png"]  # recorded, but not moved yet

    drop(inbox, "c.png", png_bytes(255))  # a new frame arrives while the watcher is down
    counting = CountingDetector(detector)
    with FolderWatcher(counting, inbox, settle_s=0.0) as w:
        assert w.poll() == 1  # only c.png is new

    assert counting.batches == [1]  # a.png and b.png were moved without scoring
    assert inbox_images(inbox) == []
    assert files(inbox / "ng") == ["a.png", "c.png"]
    assert files(inbox / "ok") == ["b.png"]
    rows = read_rows(inbox)
    assert sorted(row["file"] for row in rows) == ["a.png", "b.png", "c.png"]  # one row each


def test_a_row_cut_short_by_a_crash_is_dropped_and_the_file_rescored(tmp_path, detector):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox, "done.png", png_bytes(0))
    watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0)
    data = png_bytes(255)
    drop(inbox, "torn.png", data)
    with open(inbox / "results.csv", "a", encoding="utf-8") as f:
        f.write(f"2026-01-01T00:00:00.000+00:00,torn.png,{hashlib.sha256(data).hexdigest()},12")

    assert watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0) == 1

    rows = read_rows(inbox)
    assert [row["file"] for row in rows] == ["done.png", "torn.png"]
    assert rows[1]["verdict"] == "ng" and rows[1]["moved_to"] == "ng/torn.png"
    assert (inbox / "results.csv").read_text(encoding="utf-8").endswith("\n")


def test_reused_names_never_overwrite(tmp_path, detector):
    inbox = tmp_path / "inbox"
    (inbox / "ok").mkdir(parents=True)
    earlier = png_bytes(1)
    (inbox / "ok" / "frame.png").write_bytes(earlier)
    first, second, third = png_bytes(2), png_bytes(3), png_bytes(4)
    drop(inbox, "frame.png", first)
    drop(inbox, "frame__1.png", second)  # a real name equal to the first suffix
    watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0)
    drop(inbox, "frame.png", third)  # the camera restarted its counter
    watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0)

    ok = inbox / "ok"
    assert (ok / "frame.png").read_bytes() == earlier
    contents = {name: (ok / name).read_bytes() for name in files(ok)}
    assert len(contents) == 4
    assert sorted(contents.values()) == sorted([earlier, first, second, third])
    rows = read_rows(inbox)
    assert len(rows) == 3
    assert len({row["moved_to"] for row in rows}) == 3
    for row in rows:
        assert hashlib.sha256((inbox / row["moved_to"]).read_bytes()).hexdigest() == row["sha256"]


def test_unreadable_images_go_to_error_and_the_watcher_goes_on(tmp_path, detector):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = png_bytes(255)
    drop(inbox, "truncated.png", good[:40])
    drop(inbox, "text.png", b"this is not an image")
    drop(inbox, "empty.jpg", b"")
    drop(inbox, "good.png", good)

    assert watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0) == 4

    assert files(inbox / "error") == ["empty.jpg", "text.png", "truncated.png"]
    assert files(inbox / "ng") == ["good.png"]
    rows = {row["file"]: row for row in read_rows(inbox)}
    for name in ("truncated.png", "text.png", "empty.jpg"):
        assert rows[name]["verdict"] == "error"
        assert rows[name]["score"] == ""
        assert name in rows[name]["error"] and "corrupt or unsupported" in rows[name]["error"]
    assert rows["good.png"]["verdict"] == "ng"


def test_one_watcher_per_inbox_and_clear_errors(tmp_path, detector, model_path, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with FolderWatcher(detector, inbox, settle_s=0.0), pytest.raises(
            ValueError, match="another watcher is already running"):
        FolderWatcher(detector, inbox)
    with pytest.raises(FileNotFoundError, match="missing"):
        FolderWatcher(detector, tmp_path / "missing")
    with pytest.raises(ValueError, match="output folders"):
        FolderWatcher(detector, inbox / "ok", out_dir=inbox)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a watcher results file"):
        FolderWatcher(detector, inbox, out_dir=tmp_path / "other")

    assert main([str(tmp_path / "nope.onnx"), str(inbox), "--once", "--quiet"]) == 2
    assert "nope.onnx does not exist" in capsys.readouterr().err
    assert main([str(model_path), str(inbox), "--batch-size", "0", "--quiet"]) == 2
    assert "batch_size must be at least 1" in capsys.readouterr().err


def test_files_survive_a_move_across_filesystems(tmp_path, detector, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = png_bytes(255)
    drop(inbox, "frame.png", data)
    real_rename = os.rename

    def rename(source, target):  # what the OS says when out/ is on another disk
        if Path(source).parent == inbox:
            raise OSError(watcher.errno.EXDEV, "Invalid cross-device link")
        return real_rename(source, target)

    monkeypatch.setattr(watcher.os, "rename", rename)
    assert watch_folder(detector, inbox, once=True, poll_s=0.01, settle_s=0.0) == 1
    assert inbox_images(inbox) == []
    assert (inbox / "ng" / "frame.png").read_bytes() == data
    assert [p.name for p in (inbox / "ng").iterdir()] == ["frame.png"]  # no .part left


def test_subprocess_without_torch_picks_up_files_and_stops_on_sigterm(tmp_path, model_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox, "before.png", png_bytes(0))  # already there when it starts
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(model_path), str(inbox), "--poll", "0.05",
         "--settle", "0.1", "--device", "cpu", "--threads", "1"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    # A reader thread, so waiting for a log line is bounded even if nothing comes.
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr],
                              daemon=True)
    reader.start()
    try:
        line = ""
        while "watching" not in line:
            line = lines.get(timeout=WAIT_S)
            assert "Traceback" not in line and "error" not in line, line
        drop(inbox, "during_white.png", png_bytes(255))
        drop(inbox, "during_black.png", png_bytes(0))
        deadline = time.monotonic() + WAIT_S
        while len(files(inbox / "ok")) + len(files(inbox / "ng")) < 3:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the watcher did not handle the new files"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT_S)
    reader.join(timeout=WAIT_S)
    log = "".join(lines.get() for _ in range(lines.qsize()))
    assert "stopped; 3 file(s) handled" in log
    assert files(inbox / "ok") == ["before.png", "during_black.png"]
    assert files(inbox / "ng") == ["during_white.png"]
    assert sorted(row["file"] for row in read_rows(inbox)) == [
        "before.png", "during_black.png", "during_white.png"]


def test_kill_9_at_any_moment_loses_and_doubles_nothing(tmp_path, model_path):
    """A camera keeps dropping frames (reusing names) while the watcher is SIGKILLed again
    and again: at the end every frame has exactly one row and exactly one file, its own."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    command = [sys.executable, "-m", "anomalykit.serve.watcher", str(model_path), str(inbox),
               "--poll", "0.01", "--settle", "0.02", "--batch-size", "4", "--device", "cpu",
               "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV)
    sent: list[str] = []
    try:
        for i in range(60):
            name = f"frame_{i % 7}.png"
            deadline = time.monotonic() + WAIT_S
            while (inbox / name).exists():  # the camera's ring of 7 names: wait for the slot
                assert time.monotonic() < deadline, f"{name} was never picked up"
                time.sleep(0.005)
            data = png_bytes(i, (8, 8 + i))  # distinct content and sizes
            drop(inbox, name, data)
            sent.append(hashlib.sha256(data).hexdigest())
            if i % 10 == 9:
                time.sleep(0.01 * (i % 4))  # land the kill at different stages
                process.kill()
                process.wait(timeout=WAIT_S)
                process = subprocess.Popen(command, cwd=ROOT, env=ENV)
        deadline = time.monotonic() + WAIT_S
        while inbox_images(inbox):
            assert process.poll() is None and time.monotonic() < deadline, inbox_images(inbox)
            time.sleep(0.02)
        process.kill()  # the last kill too: SIGTERM's clean stop is tested above
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT_S)

    rows = read_rows(inbox)
    assert sorted(row["sha256"] for row in rows) == sorted(sent)  # one row per frame
    stored = [hashlib.sha256(p.read_bytes()).hexdigest()
              for verdict in ("ok", "ng", "error") for p in (inbox / verdict).iterdir()]
    assert sorted(stored) == sorted(sent)  # one file per frame, none left behind
    for row in rows:
        assert hashlib.sha256((inbox / row["moved_to"]).read_bytes()).hexdigest() == row["sha256"]


def test_runs_as_a_single_file_beside_runtime_py(tmp_path, model_path):
    """deploy/README's line-PC install: watcher.py copied next to runtime.py, no anomalykit."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "anomalykit" / "export" / "runtime.py", app / "runtime.py")
    shutil.copy(ROOT / "anomalykit" / "serve" / "watcher.py", app / "watcher.py")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox, "frame.png", png_bytes(255))
    blocked = ("import runpy, sys; sys.modules['anomalykit'] = sys.modules['torch'] = None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocked, str(app / "watcher.py"), str(model_path),
                           str(inbox), "--once", "--settle", "0", "--device", "cpu"],
                          cwd=tmp_path, env={**ENV, "PYTHONPATH": ""}, capture_output=True,
                          text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    assert files(inbox / "ng") == ["frame.png"]
