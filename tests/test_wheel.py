"""A non-editable install from the wheel runs the named profiles from any directory.

The wheel is built from a copy of the sources (so no ``build/`` lands in the checkout) and
installed with ``--no-deps`` into a fresh virtual environment; a ``.pth`` file lets that
environment import the test environment's packages (torch, ...) without installing them.
The ``.pth`` lists the directory only, so Python does not run the ``.pth`` files inside it:
the editable install of this checkout stays out, and the test checks that the installed
copy is what runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from anomalykit.data import SYNTHETIC_CATEGORIES, generate_synthetic

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CATEGORY = SYNTHETIC_CATEGORIES[0]


def run(*args: object, cwd: Path, env: dict[str, str] | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "anomalykit", source / "anomalykit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", out, source, cwd=source)
    (built,) = out.glob("anomalykit-*.whl")
    return built


def test_wheel_ships_every_profile(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("anomalykit/configs/")}
    expected = {f"anomalykit/{p.relative_to(REPO / 'anomalykit').as_posix()}"
                for p in (REPO / "anomalykit" / "configs").glob("*/*.yaml")}
    assert expected and expected <= shipped


def test_installed_wheel_trains_with_a_named_profile(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-index", "--ignore-installed", wheel, cwd=tmp_path)
    site_dir = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                        cwd=tmp_path).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site_dir / "test_environment.pth").write_text("".join(f"{p}\n" for p in ours),
                                                   encoding="utf-8")

    data = tmp_path / "data"
    generate_synthetic(data, categories=[CATEGORY], seed=0, image_size=32, n_train=12,
                       n_test_good=4, n_test_defect=4)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "ANOMALYKIT_CONFIGS")}
    env.update(OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    imported = run(python, "-c", "import anomalykit; print(anomalykit.__file__)", cwd=workdir,
                   env=env).stdout.strip()
    assert Path(imported).is_relative_to(venv), imported  # not the editable checkout

    out = tmp_path / "run"
    done = run(venv / "bin" / "anomalykit", "train", "ae", "--root", data,
               "--category", CATEGORY, "--config", "quick", "--set", "epochs=1", "--set",
               "max_steps=2", "--out", out, "--device", "cpu", "--quiet", cwd=workdir, env=env)
    assert (out / "model.ckpt").is_file()
    assert "saved model to" in done.stdout
