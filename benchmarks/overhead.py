"""Where the host time of one public call goes, on small arrays (device work negligible).

    python benchmarks/overhead.py            # NumPy; torch and JAX on the default device; cProfile of each

Prints microseconds per call of packq's public call against the bare compiled call it dispatches
(the jit-wrapped JAX function; the Triton launch for CUDA tensors), and the top of a profile.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
import packq  # noqa: E402


def us(fn, n=3000):
    for _ in range(100):
        fn()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n * 1e6)
    return min(best)


def main() -> None:
    import jax
    import jax.numpy as jnp
    import torch

    qw = np.zeros((64, 8), np.int32)
    qz = np.zeros((1, 8), np.int32)
    rows = {"numpy": (lambda: packq.fast_awq_to_gptq(qw, qz), None)}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tw, tz = torch.from_numpy(qw).to(dev), torch.from_numpy(qz).to(dev)
    bare_t = None
    if dev == "cuda":
        from packq.backends import triton_kernels as tk
        from packq.formats import awq

        calls = [(awq.weight_to_gptq, (tw,), {}), (awq.zeros_to_gptq, (tz,), {})]
        bare_t = lambda: tk.fused(calls)  # noqa: E731
    rows[f"torch {dev}"] = (lambda: packq.fast_awq_to_gptq(tw, tz), bare_t)
    jw, jz = jnp.asarray(qw), jnp.asarray(qz)
    jitted = jax.jit(packq.fast_awq_to_gptq)
    rows[f"jax {jax.default_backend()}"] = (lambda: packq.fast_awq_to_gptq(jw, jz), lambda: jitted(jw, jz))
    for name, (call, bare) in rows.items():
        line = f"{name:12s} packq {us(call):7.1f} us/call"
        if bare is not None:
            line += f"   bare compiled call {us(bare):7.1f} us   overhead {us(call) - us(bare):6.1f} us"
        print(line)
    for name, (call, _) in rows.items():
        print(f"--- {name}")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            call()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
