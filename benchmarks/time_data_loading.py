"""Seconds per pass over a category's training images, with and without the decode-once cache.

    python benchmarks/time_data_loading.py --root DATA --category magnetic_tile [--size 64]

Prints one line per mode: the first and second pass (epoch) over ``train/good`` through a
DataLoader (batch 32, no workers), for ``cache=False`` (decode every access), the memory
cache (the default) and a disk cache read back by a new dataset (a new process's view).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from anomalykit.data import AnomalyDataset, scan_mvtec


def passes(dataset: AnomalyDataset, n: int = 2) -> list[float]:
    loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=0)
    seconds = []
    for _ in range(n):
        started = time.perf_counter()
        for _batch in loader:
            pass
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = scan_mvtec(args.root, args.category, "train")
    print(f"{len(records)} images, {args.size} px")
    uncached = AnomalyDataset(records, args.size, cache=False)
    print("no cache      passes s:", [round(s, 3) for s in passes(uncached)])
    print("memory cache  passes s:", [round(s, 3) for s in passes(AnomalyDataset(records, args.size))])
    with tempfile.TemporaryDirectory() as cache_dir:
        passes(AnomalyDataset(records, args.size, cache_dir=cache_dir), 1)  # fills the disk cache
        print("disk cache, new dataset, passes s:",
              [round(s, 3) for s in passes(AnomalyDataset(records, args.size, cache_dir=cache_dir))])


if __name__ == "__main__":
    main()
