"""Greedy k-center coreset (farthest-point sampling), PatchCore's memory-bank subsampling.

Greedy k-center (Sener & Savarese 2018; PatchCore, Roth et al. 2022, alg. 1): start from one
point, then repeatedly add the point farthest from every centre chosen so far. The chosen set
covers the data: every point lies within the last step's max-min distance of some centre.

The plain vectorised algorithm keeps a (M,) vector of squared distances to the nearest centre
and, per pick, computes the new centre's distance to all M points (a matrix-vector product),
takes the elementwise minimum and the argmax. That reads the whole (M, D) matrix once per
pick: memory-bound, tens of ms per pick for PatchCore's ~200k-400k patches.

This implementation gives the same picks with the work batched into rounds. A round looks
only at the ``pool_size`` farthest points (the pool) and at ``bound``, the largest distance
outside the pool. Distances only shrink as centres are added, so no point outside the pool
can exceed ``bound`` during the round. The round picks the global farthest point (always the
exact next pick), updates the pool's distances to it, and keeps picking the pool's farthest
point while that distance is still above ``bound``: each such pick is provably the one the
plain algorithm makes next. When the pool's best falls to ``bound`` the round ends and every
point is updated against all of the round's centres at once, one (chunk, D) x (D, a) matrix
product per chunk, compute-bound at near-GEMM speed instead of memory-bound. In PatchCore's
high-dimensional projections the pool's far points are far from each other too, so rounds
are long (hundreds of picks). Ties are broken towards the lower index, as the plain
algorithm's argmax does; near-ties can break differently from a matrix-vector
implementation, because the batched products round differently (the tests compare the pick
order with a naive reference on data without near-ties).
Timings for PatchCore's sizes are in benchmarks/results/coreset_timing/. Everything is torch
on the input's device; the Python loop runs over picks only (a few small-vector operations
each), never over points or candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from anomalykit.errors import ConfigError

# Rows per chunk of the round's distance update: (chunk, a) distances stay in cache (measured
# 4096 rows x 512 centres: ~90 GFLOP/s on one core, against ~58 for 32768 rows).
_UPDATE_CHUNK = 4096


def random_projection(x: Tensor, dim: int, *, seed: int) -> Tensor:
    """(M, D) -> (M, dim) Gaussian random projection (Johnson-Lindenstrauss), seeded.

    Entries N(0, 1 / dim), so squared distances are preserved in expectation. Returns ``x``
    itself when ``D <= dim`` (projecting would not save anything).
    """
    if x.shape[1] <= dim:
        return x
    g = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(x.shape[1], dim, generator=g, dtype=x.dtype) / dim ** 0.5
    return x @ matrix.to(x.device)


def _squared_distances(points: Tensor, sq_norms: Tensor, centre: Tensor) -> Tensor:
    """(M, D), (M,), (D,) -> (M,) ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2, clamped at 0."""
    return (sq_norms - 2.0 * (points @ centre) + centre.dot(centre)).clamp_min_(0.0)


def _update_min_distances(x: Tensor, sq: Tensor, min_sq: Tensor, centres: Tensor) -> None:
    """min_sq (M,) <- min(min_sq, squared distance of each row of x (M, D) to any of centres (a, D))."""
    centre_sq = centres.pow(2).sum(1)
    for start in range(0, x.shape[0], _UPDATE_CHUNK):
        rows = slice(start, start + _UPDATE_CHUNK)
        # ||c||^2 - 2 x.c in one addmm; ||x||^2 is the same for every centre, added after the min.
        nearest = torch.addmm(centre_sq, x[rows], centres.T, alpha=-2.0).amin(1) + sq[rows]
        torch.minimum(min_sq[rows], nearest.clamp_min_(0.0), out=min_sq[rows])


def greedy_coreset(features: Tensor, k: int, *, seed: int = 0, start: int | None = None,
                   pool_size: int = 1024,
                   progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Indices (k,) int64 of a greedy k-center coreset of ``features`` (M, D), in pick order.

    Args:
        features: (M, D) points (PatchCore: randomly projected patch features), any device.
        k: coreset size, 1 <= k <= M.
        seed: picks the first centre (uniformly at random) when ``start`` is None.
        start: index of the first centre (overrides ``seed``).
        pool_size: points a round considers (speed only: the picks do not depend on it).
        progress: optional ``progress(picked, k)`` callback after each round.

    Exact greedy: pick i + 1 is the point whose distance to its nearest pick among the first
    i + 1 is largest (ties: the lowest index). ``coreset_coverage`` returns that distance.
    """
    if features.ndim != 2:
        raise ConfigError(f"greedy_coreset needs (M, D) features, got shape {tuple(features.shape)}")
    m = features.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"coreset size k must be in [1, {m}] for {m} points, got {k}")
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ConfigError(f"pool_size must be an integer >= 1, got {pool_size!r}")
    x = features
    sq = x.pow(2).sum(1)
    if start is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        start = int(torch.randint(m, (1,), generator=g))
    picks = [start]
    min_sq = _squared_distances(x, sq, x[start])  # squared distance to the nearest centre
    min_sq[start] = 0.0  # exactly: the expanded formula can leave a rounding residue
    pool_size = min(pool_size, m)
    while len(picks) < k:
        # The pool, sorted by index so argmax ties go to the lower index as in the plain
        # algorithm, and the largest distance outside it.
        values, order = min_sq.topk(min(pool_size + 1, m))
        bound = float(values[pool_size]) if m > pool_size else float("-inf")
        pool = order[:pool_size].sort().values
        pool_x, pool_sq, pool_d = x[pool], sq[pool], min_sq[pool]
        new = int(min_sq.argmax())  # the exact next pick, whether or not it is in the pool
        chosen = []
        while True:
            chosen.append(new)
            torch.minimum(pool_d, _squared_distances(pool_x, pool_sq, x[new]), out=pool_d)
            pool_d[pool == new] = 0.0
            if len(picks) + len(chosen) == k:
                break
            best = int(pool_d.argmax())
            if not float(pool_d[best]) > bound:  # an outside point might be as far: new round
                break
            new = int(pool[best])
        picks.extend(chosen)
        chosen_index = torch.tensor(chosen, device=x.device)
        _update_min_distances(x, sq, min_sq, x[chosen_index])
        min_sq[chosen_index] = 0.0
        if progress is not None:
            progress(len(picks), k)
    return torch.tensor(picks, dtype=torch.long, device=x.device)


def coreset_coverage(features: Tensor, picks: Tensor) -> Tensor:
    """(len(picks),) the covering radius after each pick: max over points of the distance to
    the nearest pick so far. Non-increasing; for checks and plots (O(M k) memory in chunks)."""
    sq = features.pow(2).sum(1)
    min_sq = torch.full_like(sq, float("inf"))
    out = torch.empty(len(picks), dtype=features.dtype, device=features.device)
    for i, p in enumerate(picks.tolist()):
        torch.minimum(min_sq, _squared_distances(features, sq, features[p]), out=min_sq)
        out[i] = min_sq.max().sqrt()
    return out
