"""Which MLX affine encodings of a GPTQ/AWQ module are exact, on which MLX backend, and at what cost.

Run where mlx is installed (the CPU numbers are mlx's own ``mx.dequantize``; Metal's come from packq's
reproduction of its arithmetic, ``packq.dequantize_mlx(arithmetic="metal")``, as there is no Apple GPU here):

    python scripts/mlx_encodings.py --out benchmarks/results/mlx_encodings.json

For random 4-bit group-128 modules (K = N = 2048, float16 scales; asymmetric zero-points, and symmetric
ones, z = 8) it counts the weights each encoding makes MLX compute differently from (q - z) * s rounded
once to float16 (the source's weights), and times ``mx.quantized_matmul`` on the CPU for each (one token
and 32 tokens, float16 activations; medians of a few runs on a shared 2-core machine: indicative only).

Encodings: float32 scales and biases (packq's default); float16 (MLX's usual form; bias -s * z rounded);
"5-bit": q' = q - z + 16 in 5 bits with bias -16 * s, exact in float16 (a wider code, so that the bias
is a power-of-two multiple of the scale); "8-bit": q' = q - z + 128 with bias -128 * s, likewise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import packq

K = N = 2048
G = 128


def timed(fn, repeat: int = 7) -> float:
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    import mlx.core as mx

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    out_path = ap.parse_args().out
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (K, N))
    s = (rng.random((K // G, N)) * 0.01 + 1e-3).astype(np.float16)
    report = {"machine": "this project's 2-core AMD EPYC CPU (Linux x86-64), mlx CPU backend", "mlx": mx.__version__,
              "date": time.strftime("%Y-%m-%d"), "shape": [K, N], "group_size": G, "cases": {}}
    for kind in ("asymmetric", "symmetric"):
        z = np.full((K // G, N), 8) if kind == "symmetric" else rng.integers(0, 16, (K // G, N))
        source = ((q - np.repeat(z, G, 0)) * np.repeat(s.astype(np.float64), G, 0)).astype(np.float16).T  # (N, K)
        qz = packq.pack(z, "column")
        qw = packq.pack(q, "row")
        forms = {}
        for name in ("float32", "float16", "5-bit", "8-bit"):
            if name in ("float32", "float16"):
                bits = 4
                w, sc, b = packq.gptq_to_mlx(qw, qz, s, dtype=name)
            else:  # a wider code whose bias is a power-of-two multiple of the scale, exact in float16
                bits = 5 if name == "5-bit" else 8
                c = 1 << (bits - 1)
                code = (q - np.repeat(z, G, 0) + c).T  # (N, K), in [1, 2c - 1]
                w = _stream(code, bits)
                sc = np.ascontiguousarray(s.T)
                b = (-c * sc.astype(np.float32)).astype(np.float16)
            cpu = np.array(mx.dequantize(mx.array(w.view(np.uint32)), mx.array(sc), mx.array(b), group_size=G,
                                         bits=bits)).astype(np.float16)
            metal = _metal(w, sc, b, bits)
            x1 = mx.array(rng.normal(size=(1, K)).astype(np.float16))
            x32 = mx.array(rng.normal(size=(32, K)).astype(np.float16))
            args = (mx.array(w.view(np.uint32)), mx.array(sc), mx.array(b))
            forms[name] = {
                "bits": bits, "scales": str(sc.dtype),
                "cpu_differing": int(np.count_nonzero(cpu != source)),
                "metal_differing": int(np.count_nonzero(metal.astype(np.float16) != source)),
                "bits_per_weight": bits + 2 * 8 * sc.dtype.itemsize / G,
                "cpu_seconds_1_token": timed(lambda x=x1, a=args, bt=bits: mx.quantized_matmul(
                    x, *a, transpose=True, group_size=G, bits=bt)),
                "cpu_seconds_32_tokens": timed(lambda x=x32, a=args, bt=bits: mx.quantized_matmul(
                    x, *a, transpose=True, group_size=G, bits=bt)),
            }
        report["cases"][kind] = {"weights": K * N, "forms": forms}
        print(kind, json.dumps(forms, indent=1), flush=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")


def _stream(values: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) values packed along K as MLX's little-endian bit stream (uint32); any width MLX has."""
    v = values.astype(np.uint64)
    flat = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).reshape(*v.shape[:-1], -1, 32)
    return (flat << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def _metal(w: np.ndarray, sc: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    if bits in (2, 3, 4, 8):
        return packq.dequantize_mlx(w, sc, b, bits=bits, arithmetic="metal")
    from packq.formats.mlx import dequantize

    n = w.shape[0]
    flat = ((w.astype(np.uint64)[..., None] >> np.arange(32, dtype=np.uint64)) & 1).reshape(n, -1, bits)
    q = (flat << np.arange(bits, dtype=np.uint64)).sum(-1).astype(np.int16)
    return dequantize(q, sc, b, str(sc.dtype), "metal")


if __name__ == "__main__":
    main()
