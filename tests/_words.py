"""Deterministic packed words for large fixtures, shared by the fixture script and the tests."""

from __future__ import annotations

import numpy as np


def raw_words(seed: int, shape) -> np.ndarray:
    """int32 words from PCG64's raw stream, which NumPy keeps stable across releases."""
    n = int(np.prod(shape))
    raw = np.random.PCG64(seed).random_raw((n + 1) // 2).astype(np.uint64)
    return raw.view(np.uint32)[:n].view(np.int32).reshape(shape)
