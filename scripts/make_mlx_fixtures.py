"""Golden fixtures for packq's MLX relayouts and MLX's arithmetic: tests/fixtures/mlx.npz.

Everything expected here is computed without packq: a bit-stream packer written below (value i of a
row at bits [b*i, b*i + b) of the row's stream of 32-bit words, little-endian), AWQ's interleave
written out, biases -s * z in float64 rounded once, MLX's Metal arithmetic in float64 (s * q + b,
rounded to float32, then to the scales' dtype), and MLX's CPU arithmetic taken from mlx itself
(``mx.dequantize`` on the CPU, mlx 0.32.4): run this where mlx is installed.

    python scripts/make_mlx_fixtures.py    # writes tests/fixtures/mlx.npz
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mlx.npz"
K, N, G = 128, 32, 64
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis as one little-endian bit stream of 32-bit words (int32)."""
    v = values.astype(np.uint64)
    flat = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).reshape(*v.shape[:-1], -1, 32)
    return (flat << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32).view(np.int32)


def awq_pack(values: np.ndarray) -> np.ndarray:
    v = values.reshape(*values.shape[:-1], -1, 8)[..., AWQ_ORDER].astype(np.uint32)
    return np.bitwise_or.reduce(v << (4 * np.arange(8, dtype=np.uint32)), axis=-1).view(np.int32)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded once to dtype (float32, float16)."""
    return x.astype(dtype)


def main() -> None:
    import mlx.core as mx

    rng = np.random.default_rng(22)
    out: dict[str, np.ndarray] = {}
    for bits in (2, 3, 4, 8):
        q = rng.integers(0, 1 << bits, (K, N))
        z = rng.integers(0, 1 << bits, (K // G, N))
        z[0, :3] = 0  # zero-points of 0 too
        s = (rng.random((K // G, N)) * 0.02 + 1e-3).astype(np.float16)
        case = f"mlx/b{bits}"
        out[f"{case}/q"] = q.astype(np.int16)
        out[f"{case}/gptq_qweight"] = np.ascontiguousarray(stream(q.T, bits).T)  # packed along K, per column
        out[f"{case}/gptq_qzeros"] = stream(z, bits)  # v2, packed along N
        out[f"{case}/scales"] = s.view(np.uint16)
        out[f"{case}/weight"] = stream(q.T, bits)  # MLX: (N, K*b/32)
        out[f"{case}/ct_zero_point"] = np.ascontiguousarray(stream(z, bits).T)  # (N*b/32, G), packed along N
        if bits == 4:
            out[f"{case}/awq_qweight"] = awq_pack(q)
            out[f"{case}/awq_qzeros"] = awq_pack(z)
        exact = -(s.astype(np.float64) * z)  # (G, N)
        for dtype in ("float32", "float16"):
            sc = np.ascontiguousarray(s.T.astype(dtype))
            bi = np.ascontiguousarray(rounded(exact.T, dtype))
            out[f"{case}/{dtype}/mlx_scales"] = sc.view(f"u{sc.itemsize}")
            out[f"{case}/{dtype}/mlx_biases"] = bi.view(f"u{bi.itemsize}")
            qf = q.T.reshape(N, K // G, G).astype(np.float64)
            metal = (sc.astype(np.float64)[..., None] * qf + bi.astype(np.float64)[..., None]).astype(np.float32)
            metal = metal.astype(dtype).reshape(N, K)
            cpu = np.array(mx.dequantize(mx.array(out[f"{case}/weight"].view(np.uint32)), mx.array(sc), mx.array(bi),
                                         group_size=G, bits=bits))
            assert str(cpu.dtype) == dtype
            out[f"{case}/{dtype}/cpu"] = cpu.view(f"u{cpu.itemsize}")
            out[f"{case}/{dtype}/metal"] = metal.view(f"u{metal.itemsize}")
        source = ((q - np.repeat(z, G, 0)) * np.repeat(s.astype(np.float64), G, 0)).astype(np.float16)  # (K, N)
        out[f"{case}/source"] = np.ascontiguousarray(source.T).view(np.uint16)  # (N, K), rounded once
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({len(out)} arrays)")


if __name__ == "__main__":
    main()
