"""The reserved clean set a defense may use: drawn from the clean training set exactly as BackdoorBench
draws it, so the default subset equals its published `config/defense/index/<dataset>_index.txt`.

BackdoorBench seeds Python's `random` with `random_seed` and then takes
`random.sample(range(N), int(N * ratio))`; `random.Random(seed)` gives the same stream without touching
the global generator.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np

from ..files import check_file


class EmptyReservedSet(ValueError):
    """The reserved set would hold no sample."""


RESERVED_RATIO = 0.05  # the reserved clean fraction of the training set when none is given (BackdoorBench's)


def draw_reserved(n: int, ratio: float, seed: int = 0) -> np.ndarray:
    """`int(n * ratio)` distinct indices in [0, n), in BackdoorBench's order."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}; pass e.g. --ratio {RESERVED_RATIO}")
    return np.asarray(random.Random(seed).sample(range(n), int(n * ratio)), dtype=np.int64)


def read_index_file(path: str | os.PathLike, n: int) -> np.ndarray:
    """Indices from a text file (one integer a line, as `np.savetxt(fmt='%d')` writes them)."""
    check_file(path, "pass a file of indices to --index", "index file")
    try:
        index = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError:
        raise ValueError(f"index file {path} must hold one integer a line; regenerate it") from None
    bad = index[(index < 0) | (index >= n)]
    if len(bad):
        raise ValueError(f"index file {path} holds {bad[0]}, outside the clean training set [0, {n}); "
                         f"use an index file made for this dataset")
    values, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():  # a repeated image would weigh more, or make a one-image "set"
        raise ValueError(f"index file {path} repeats index {values[counts > 1][0]} ({counts.max()} times); "
                         f"list each index once")
    return index


def reserved_indices(n: int, ratio: Optional[float] = RESERVED_RATIO, index_file: Optional[str] = None,
                     seed: int = 0) -> np.ndarray:
    """The reserved set: `index_file` when given, else the BackdoorBench draw; never empty."""
    if index_file:
        index = read_index_file(index_file, n)
        source = f"index file {index_file}"
    else:
        ratio = RESERVED_RATIO if ratio is None else float(ratio)
        index = draw_reserved(n, ratio, seed)
        source = f"ratio {ratio} of {n} training samples"
    if len(index) == 0:
        raise EmptyReservedSet(f"the reserved clean set is empty ({source}); raise --ratio or pass --index "
                               f"with a non-empty file")
    return index
