"""On a CUDA machine: time packq's Triton kernels over tile sizes, to choose ROWS and WORDS.

    python benchmarks/triton_tiles.py           # prints median ms per tile choice, both directions, 8192 x 28672
    python benchmarks/triton_tiles.py dequant   # the dequantization kernels' tiles

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


def dequant() -> None:
    """Dequantization tiles: AWQ (rows x words) and GPTQ 4-bit and 3-bit (rows x columns), float16, group 128."""
    k, n = 8192, 28672
    rng = np.random.default_rng(0)
    aw = rng.integers(-(2**31), 2**31, (k, n // 8), dtype=np.int64).astype(np.int32)
    az = rng.integers(-(2**31), 2**31, (k // 128, n // 8), dtype=np.int64).astype(np.int32)
    s = (rng.standard_normal((k // 128, n)) * 0.01).astype(np.float16)
    want = packq.dequantize_awq(aw, az, s)
    gw3 = rng.integers(-(2**31), 2**31, (k * 3 // 32, n), dtype=np.int64).astype(np.int32)
    gz3 = rng.integers(-(2**31), 2**31, (k // 128, n * 3 // 32), dtype=np.int64).astype(np.int32)
    want3 = packq.dequantize_gptq(gw3, gz3, s, bits=3)
    gw, gz = packq.fast_awq_to_gptq(aw, az)
    x, z, sc = (torch.from_numpy(a).cuda() for a in (aw, az, s))
    g, gzt, g3, gz3t = (torch.from_numpy(a).cuda() for a in (gw, gz, gw3, gz3))
    out = torch.from_numpy(want).cuda()
    print(f"dequantization 8192 x 28672 float16: copy of the output b2b {b2b(lambda: out.clone(), 20):.4f} ms")
    act = torch.from_numpy(rng.permutation(np.arange(k) // 128).astype(np.int32)).cuda()
    want_act = packq.dequantize_gptq(gw, gz, s, act.cpu().numpy())
    for warps, rows, words, cols in [(4, 32, 32, 256), (4, 32, 64, 512), (4, 32, 16, 128), (8, 32, 32, 256), (8, 64, 64, 512),
                                     (2, 32, 16, 64)]:
        tk.DQ_WARPS, tk.DQ_ROWS, tk.DQ_WORDS, tk.DQ_COLS = warps, rows, words, cols
        assert tk.dequantize_awq(x, z, sc).cpu().numpy().tobytes() == want.tobytes()
        assert tk.dequantize_gptq(g, gzt, sc, None, 4, "v1").cpu().numpy().tobytes() == want.tobytes()
        assert tk.dequantize_gptq(g3, gz3t, sc, None, 3, "v1").cpu().numpy().tobytes() == want3.tobytes()
        assert tk.dequantize_gptq(g, gzt, sc, act, 4, "v1").cpu().numpy().tobytes() == want_act.tobytes()
        print(f"  warps={warps} rows={rows} awq words={words} gptq cols={cols}: "
              f"awq b2b {b2b(lambda: tk.dequantize_awq(x, z, sc), 20):.4f}, "
              f"gptq4 b2b {b2b(lambda: tk.dequantize_gptq(g, gzt, sc, None, 4, 'v1'), 20):.4f}, "
              f"gptq3 b2b {b2b(lambda: tk.dequantize_gptq(g3, gz3t, sc, None, 3, 'v1'), 20):.4f}, "
              f"gptq4 act-order b2b {b2b(lambda: tk.dequantize_gptq(g, gzt, sc, act, 4, 'v1'), 20):.4f} ms")


if __name__ == "__main__":
    if sys.argv[1:] == ["dequant"]:
        dequant()
        raise SystemExit
    main()
