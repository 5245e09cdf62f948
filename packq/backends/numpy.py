"""NumPy backend: the array-API core through array-api-compat, plus fast paths."""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from packq.backends import Backend


class NumpyBackend(Backend):
    name = "numpy"

    def as_int32(self, x: Any) -> Any:
        return np.asarray(x).view(np.int32)


BACKEND = NumpyBackend(xp)
