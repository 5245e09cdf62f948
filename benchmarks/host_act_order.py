"""On a CUDA machine: where the host time of an act-order `dequantize_gptq` call on torch goes.

    python benchmarks/host_act_order.py

The 4096-wide layers' act-order calls are bound by the host back to back (their kernels take 20-60 us):
this prints, for 4096 x 11008 at 4 and 3 bits, microseconds of host wall time per public call, from an idle
GPU (median of 200, each after a synchronize) and back to back (median of 5 means of 200 calls), for the
plain call (no g_idx), act-order with g_idx's range from the kernel (the default), act-order with a reduction
and copy of its own (the older path) and the bare kernel launch (no range at all); then the in-kernel call split
into its launch and its wait for the flag, and the top of a profile. Each variant's result is checked bit for
bit against NumPy first.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
import packq  # noqa: E402


def from_idle(fn, n: int = 200) -> float:
    import torch

    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def back_to_back(fn, n: int = 200) -> float:
    import torch

    means = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        means.append((time.perf_counter() - t) / n)
    return statistics.median(means) * 1e6


def main() -> None:
    import torch

    from packq.backends import torch as torch_backend
    from packq.backends import triton_kernels as tk

    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    k, n = 4096, 11008
    groups = k // 128
    scales = (rng.standard_normal((groups, n)) * 0.01).astype(np.float16)
    g_idx = rng.permutation(np.arange(k) // 128).astype(np.int32)
    t_s, t_g = torch.from_numpy(scales).to(dev), torch.from_numpy(g_idx).to(dev)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {k} x {n}, group size 128, float16; microseconds of host "
          "wall time per call")
    for bits in (4, 3):
        gw = rng.integers(-(2**31), 2**31, (k * bits // 32, n), dtype=np.int64).astype(np.int32)
        gz = rng.integers(-(2**31), 2**31, (groups, n * bits // 32), dtype=np.int64).astype(np.int32)
        t_w, t_z = torch.from_numpy(gw).to(dev), torch.from_numpy(gz).to(dev)
        plain_ref = packq.dequantize_gptq(gw, gz, scales, None, bits=bits)
        act_ref = packq.dequantize_gptq(gw, gz, scales, g_idx, bits=bits)

        def reduction():
            torch_backend.CHECK_IN_KERNEL = False
            try:
                return packq.dequantize_gptq(t_w, t_z, t_s, t_g, bits=bits)
            finally:
                torch_backend.CHECK_IN_KERNEL = True

        variants = {
            "plain (no g_idx)": (lambda: packq.dequantize_gptq(t_w, t_z, t_s, None, bits=bits), plain_ref),
            "act-order, range from the kernel": (lambda: packq.dequantize_gptq(t_w, t_z, t_s, t_g, bits=bits), act_ref),
            "act-order, range by a reduction of its own": (reduction, act_ref),
            "act-order, the kernel alone (no range)": (lambda: tk.dequantize_gptq(t_w, t_z, t_s, t_g, bits, "v1"), act_ref),
        }
        for name, (fn, ref) in variants.items():
            got = fn().cpu().numpy()
            assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes(), name
        print(f"{bits}-bit:")
        for name, (fn, _) in variants.items():
            print(f"  {name:48s} from idle {from_idle(fn):7.1f}   back to back {back_to_back(fn):7.1f}")
        launch, waited = [], []
        for _ in range(200):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, wait = tk.dequantize_gptq_checked(t_w, t_z, t_s, t_g, bits, "v1")
            t1 = time.perf_counter()
            assert wait() == (0, groups - 1)
            t2 = time.perf_counter()
            launch.append(t1 - t0)
            waited.append(t2 - t1)
        print(f"  the kernel's range, from idle: launch {statistics.median(launch) * 1e6:.1f}, wait for the flag "
              f"{statistics.median(waited) * 1e6:.1f} (median of 200)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        packq.dequantize_gptq(t_w, t_z, t_s, t_g, bits=3)
    torch.cuda.synchronize()
    prof.disable()
    print("profile of 500 back-to-back act-order calls (3-bit), by own time:")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(16)


if __name__ == "__main__":
    main()
