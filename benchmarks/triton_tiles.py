"""On a CUDA machine: time packq's Triton kernels over tile sizes, to choose ROWS and WORDS.

    python benchmarks/triton_tiles.py     # prints median ms per tile choice, both directions, 8192 x 28672

The kernels are checked against NumPy before timing. Two timings: device events around single calls
(median of 50: Python's launch included, the GPU idle meanwhile), and back to back ("b2b": the mean
of 100 calls with one wait, the device time once a launch is shorter than the kernel).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from bench import back_to_back as b2b  # noqa: E402
from bench import cuda_ms as ms  # noqa: E402

import packq  # noqa: E402
from packq.backends import triton_kernels as tk  # noqa: E402
from packq.formats import awq  # noqa: E402


def main() -> None:
    k, n = 8192, 28672
    rng = np.random.default_rng(0)
    qw = rng.integers(-(2**31), 2**31, (k, n // 8), dtype=np.int64).astype(np.int32)
    qz = rng.integers(-(2**31), 2**31, (k // 128, n // 8), dtype=np.int64).astype(np.int32)
    want_w, want_z = packq.fast_awq_to_gptq(qw, qz)
    x, z = torch.from_numpy(qw).cuda(), torch.from_numpy(qz).cuda()
    g, gz = torch.from_numpy(want_w).cuda(), torch.from_numpy(want_z).cuda()
    print(f"{torch.cuda.get_device_name()}: 8192 x 28672, copy {ms(lambda: x.clone()):.4f} ms "
          f"(back to back {b2b(lambda: x.clone()):.4f} ms)")
    to_g = lambda: tk.fused([(awq.weight_to_gptq, (x,), {}), (awq.zeros_to_gptq, (z,), {"offset": -1})])  # noqa: E731
    to_a = lambda: tk.fused([(awq.weight_to_awq, (g,), {}), (awq.zeros_to_awq, (gz,), {"offset": 1})])  # noqa: E731
    for warps in (4, 8):
        for rows, cols in [(1, 128), (2, 64), (2, 128), (4, 64), (1, 256)]:
            tk.NUM_WARPS, tk.ROWS, tk.WORDS = warps, rows, cols
            w, zz = to_g()
            assert np.array_equal(w.cpu().numpy(), want_w) and np.array_equal(zz.cpu().numpy(), want_z)
            print(f"  to GPTQ warps={warps} rows={rows:3d} words={cols:5d}: {ms(to_g):.4f} ms, b2b {b2b(to_g):.4f}")
        for rows, cols in [(4, 512), (8, 256), (8, 512), (2, 1024)]:
            tk.NUM_WARPS, tk.AWQ_ROWS, tk.AWQ_WORDS = warps, rows, cols
            assert np.array_equal(to_a()[0].cpu().numpy(), qw)
            print(f"  to AWQ  warps={warps} rows={rows:3d} words={cols:5d}: {ms(to_a):.4f} ms, b2b {b2b(to_a):.4f}")


if __name__ == "__main__":
    main()
