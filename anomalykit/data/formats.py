"""The dataset layouts the toolkit reads, by name, and telling them apart.

- ``mvtec``: ``<category>/{train/good, test/<class>, ground_truth/<defect>}``; validation
  carved from train (:mod:`anomalykit.data.mvtec`).
- ``mpdd``: the ``mvtec`` layout, read by the same reader (its quirks are handled there).
- ``visa``: ``split_csv/1cls.csv`` at the root, ``<object>/Data/{Images,Masks}``; validation
  carved from train (:mod:`anomalykit.data.visa`).
- ``loco``: ``<category>/{train/good, validation/good, test/{good, logical_anomalies,
  structural_anomalies}, ground_truth/<defect>/<stem>/*.png}``; its own validation split
  (:mod:`anomalykit.data.loco`).
- ``mvtec2``: ``<object>/{train/good, validation/good, test_public/{good, bad,
  ground_truth/bad}}``; its own validation split (:mod:`anomalykit.data.mvtec2`).
- ``btad``: ``<NN>/{train/ok, test/{ok, ko}, ground_truth/ko}``; validation carved from train
  (:mod:`anomalykit.data.btad`).

``folder`` (plain folders of good / defective images) is not a root layout and is handled by
:class:`anomalykit.pipeline.FolderData`; ``auto`` asks :func:`detect_format`.

Detection looks at each subfolder of the root (its signature files, most specific first:
LOCO's ``validation/good`` with ``test/logical_anomalies`` before MVTec AD 2's
``test_public`` before MVTec's ``train/good``) and at VisA's split file. It answers only when
every recognised category agrees; otherwise it raises, saying what it found.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomalykit.data.records import ImageRecord, list_subfolders
from anomalykit.errors import ConfigError, DataError

__all__ = ["AUTO", "FOLDER", "FORMATS", "FORMAT_CHOICES", "DatasetFormat", "detect_format",
           "get_format", "list_categories", "resolve_format", "scan_split"]

AUTO = "auto"
FOLDER = "folder"


@dataclass(frozen=True)
class DatasetFormat:
    """One root layout.

    Attributes:
        name: ``--format`` value.
        title: The dataset's name for messages.
        list_categories: ``root -> sorted category names``.
        scan: ``(root, category, split) -> records``; ``split`` is ``train``, ``test``, and
            ``val`` when :attr:`has_val`.
        has_val: The dataset ships its own validation split of good images (used instead of
            carving one from train).
    """

    name: str
    title: str
    list_categories: Callable[[Path], list[str]]
    scan: Callable[[Path, str, str], list[ImageRecord]]
    has_val: bool = False


def _formats() -> dict[str, DatasetFormat]:
    from anomalykit.data.btad import list_btad_categories, scan_btad
    from anomalykit.data.loco import list_loco_categories, scan_loco
    from anomalykit.data.mvtec import list_mvtec_categories, scan_mvtec
    from anomalykit.data.mvtec2 import list_mvtec2_categories, scan_mvtec2
    from anomalykit.data.visa import list_visa_categories, scan_visa

    return {
        "mvtec": DatasetFormat("mvtec", "MVTec AD", list_mvtec_categories, scan_mvtec),
        "mpdd": DatasetFormat("mpdd", "MPDD", list_mvtec_categories, scan_mvtec),
        "visa": DatasetFormat("visa", "VisA", list_visa_categories, scan_visa),
        "loco": DatasetFormat("loco", "MVTec LOCO AD", list_loco_categories, scan_loco, True),
        "mvtec2": DatasetFormat("mvtec2", "MVTec AD 2", list_mvtec2_categories, scan_mvtec2,
                                True),
        "btad": DatasetFormat("btad", "BTAD", list_btad_categories, scan_btad),
    }


#: The root layouts by ``--format`` name.
FORMATS: dict[str, DatasetFormat] = _formats()
#: Every ``--format`` value.
FORMAT_CHOICES: tuple[str, ...] = (AUTO, *FORMATS, FOLDER)


def get_format(name: str) -> DatasetFormat:
    """The root layout called ``name``; ConfigError listing the known ones otherwise."""
    if name not in FORMATS:
        hint = (" (a folder dataset is given with --good-dir)" if name == FOLDER else "")
        raise ConfigError(f"unknown dataset format {name!r}{hint}; choose from "
                          f"{', '.join(FORMAT_CHOICES)}")
    return FORMATS[name]


def _category_kind(folder: Path) -> str | None:
    """The layout one category folder has, most specific signature first; None if none."""
    if (folder / "train" / "ok").is_dir():
        return "btad"
    if not (folder / "train" / "good").is_dir():
        return None
    test = folder / "test"
    if (folder / "validation" / "good").is_dir() and (
            (test / "logical_anomalies").is_dir() or (test / "structural_anomalies").is_dir()):
        return "loco"
    if (folder / "test_public").is_dir():
        return "mvtec2"
    return "mvtec"


def detect_format(root: str | os.PathLike[str]) -> str:
    """The layout of ``root`` when it is unambiguous.

    MPDD and MVTec AD share one layout and one reader; such a root is reported as ``mvtec``.

    Raises:
        DataError: ``root`` is not a folder; no subfolder has a known layout (says what the
            root holds, and when ``root`` is itself one category, says so); categories of
            different layouts are mixed (lists them); both VisA's split file and categories
            of another layout are present. Each message asks for ``--format``.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"dataset root {base} does not exist or is not a folder")
    found: dict[str, list[str]] = {}
    if (base / "split_csv" / "1cls.csv").is_file():
        found["visa"] = ["split_csv/1cls.csv"]
    subfolders = list_subfolders(base)
    for folder in subfolders:
        kind = _category_kind(folder)
        if kind is not None:
            found.setdefault(kind, []).append(folder.name)
    if len(found) == 1:
        return next(iter(found))
    choices = ", ".join(FORMATS)
    if not found:
        own = _category_kind(base)
        if own is not None:
            raise DataError(f"{base} looks like one {FORMATS[own].title} category, not a dataset "
                            f"root: pass its parent as --root and --category {base.name}")
        names = ", ".join(p.name for p in subfolders[:10]) or "no subfolders"
        more = f" and {len(subfolders) - 10} more" if len(subfolders) > 10 else ""
        raise DataError(f"cannot tell the dataset format of {base}: it holds {names}{more}, and "
                        "no category folder with train/good or train/ok, nor "
                        f"split_csv/1cls.csv; pass --format ({choices}) or use --good-dir for "
                        "plain folders of images")
    described = "; ".join(f"{FORMATS[kind].title} ({', '.join(names[:5])}"
                          f"{', ...' if len(names) > 5 else ''})" for kind, names in found.items())
    raise DataError(f"the dataset format of {base} is ambiguous: it holds {described}; pass "
                    f"--format ({choices})")


def resolve_format(root: str | os.PathLike[str], name: str | None) -> str:
    """``name`` checked, or the detected layout of ``root`` for ``None`` / ``auto``."""
    if name is None or name == AUTO:
        return detect_format(root)
    return get_format(name).name


def list_categories(root: str | os.PathLike[str], name: str | None = AUTO) -> list[str]:
    """The categories of ``root`` in layout ``name`` (detected for ``auto``), sorted."""
    return get_format(resolve_format(root, name)).list_categories(Path(root))


def scan_split(root: str | os.PathLike[str], category: str, split: str,
               name: str | None = AUTO) -> list[ImageRecord]:
    """The records of one split (``train``, ``test``, or ``val`` for layouts with their own
    validation split) of ``root/category`` in layout ``name``. Files are not decoded here.

    Raises:
        ConfigError: unknown format, or ``val`` asked of a layout without one.
        DataError: see the layout's reader.
    """
    layout = get_format(resolve_format(root, name))
    if split == "val" and not layout.has_val:
        raise ConfigError(f"{layout.title} has no validation split of its own")
    return layout.scan(Path(root), category, split)
