"""Shared fixtures: tiny real datasets on disk, and single-threaded torch for stable timings."""

from __future__ import annotations

import torch

# Two cores on CI: one intra-op thread per test process keeps runs reproducible and avoids
# oversubscription when a test starts a subprocess.
torch.set_num_threads(1)
