"""Regenerate tests/fixtures/gguf_golden.npz: GGUF blocks written by gguf-py's own quantizer (an independent writer).

The integer inputs are chosen so that gguf-py's quantizer picks d = s (every Q4_0 block holds a
q - z of -8, every Q5_0 block a -16, every Q8_0 block a +-127), so its bytes are the exact
encoding packq must produce from (q, z, s) on every backend. Needs ``pip install gguf==0.19.0``.

    python scripts/make_gguf_golden.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf_golden.npz"
K, N, GROUP = 128, 8, 64  # 4 blocks per row, 2 per group
#: type -> (lo, hi, zero-point, the value every block holds)
CASES = {"Q4_0": (-8, 7, 8, -8), "Q5_0": (-16, 15, 16, -16), "Q8_0": (-127, 127, 128, 127)}


def main() -> None:
    rng = np.random.default_rng(20)
    out: dict[str, np.ndarray] = {}
    for name, (lo, hi, zero, forced) in CASES.items():
        groups = K // GROUP
        z = rng.integers(zero - 2, zero + 3, (groups, N)).astype(np.int32)
        v = rng.integers(lo, hi + 1, (K, N))
        v[::32] = forced  # the first weight of every block: gguf-py's quantizer then chooses d = s
        zk = np.repeat(z, GROUP, axis=0)
        q = (v + zk).astype(np.int32)
        # gguf-py's d is max / -m (Q4_0, Q5_0) or amax / 127 (Q8_0): d = s needs s > 0 (negative scales
        # are encoded as they are by packq, and checked against gguf-py's reader in the tests)
        s = rng.uniform(0.001, 0.05, (groups, N)).astype(np.float16)
        w = (np.repeat(s, GROUP, axis=0).astype(np.float32) * v.astype(np.float32)).T.copy()  # (N, K)
        blocks = quants.quantize(w, getattr(GGMLQuantizationType, name))
        back = quants.dequantize(blocks, getattr(GGMLQuantizationType, name))
        assert back.view(np.uint32).tolist() == w.view(np.uint32).tolist(), name  # gguf-py itself reads them back
        out |= {f"{name}_q": q, f"{name}_z": z, f"{name}_s": s, f"{name}_blocks": blocks}
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
