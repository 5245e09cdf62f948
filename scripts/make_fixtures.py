"""Write the golden fixtures in tests/fixtures/ from references independent of packq.

- 4-bit AWQ/GPTQ: the seed's own torch code (LoRAX's conversion_utils), with
  its "row" apply_order replaced by the meaning users expect (reorder within
  every group of 8 rows) and the int64 sums it relies on.
- 2/3/8-bit GPTQ layouts: a value-by-value reference that writes each value's
  bits one at a time into a Python-int bit stream.
- Dequantization: torch float32 arithmetic, rounded once to the scales' dtype.

Nothing here imports packq. Run: python scripts/make_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _words import raw_words  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
REVERSE_AWQ_PACK_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


# --- the seed's torch code, 2-D, as LoRAX ships it (row apply_order fixed) ---
def seed_pack(imatrix: torch.Tensor, direction: str = "column") -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=imatrix.device)
    imatrix = imatrix.to(torch.int8) & 0x0F
    if direction == "column":
        imatrix = imatrix.view(-1, imatrix.shape[1] // 8, 8)
        qmatrix = torch.bitwise_left_shift(imatrix, shifts[None, None, :]).sum(dim=-1)
    else:
        imatrix = imatrix.view(imatrix.shape[0] // 8, 8, -1)
        qmatrix = torch.bitwise_left_shift(imatrix, shifts[None, :, None]).sum(dim=1)
    return qmatrix.to(torch.int32)


def seed_unpack(qmatrix: torch.Tensor, direction: str = "column") -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=qmatrix.device)
    if direction == "column":
        imatrix = torch.bitwise_right_shift(qmatrix[:, :, None], shifts[None, None, :]).view(qmatrix.shape[0], -1)
    else:
        imatrix = torch.bitwise_right_shift(qmatrix[:, None, :], shifts[None, :, None]).view(-1, qmatrix.shape[-1])
    return imatrix.to(torch.int8) & 0x0F


def seed_apply_order(imatrix: torch.Tensor, direction: str = "column", order=AWQ_PACK_ORDER) -> torch.Tensor:
    if direction == "column":
        return imatrix.view(-1, 8)[:, order].view(imatrix.shape)
    # the seed reshapes to (8, -1) here; users expect groups of 8 consecutive rows
    return imatrix.view(-1, 8, imatrix.shape[-1])[:, order, :].view(imatrix.shape)


def seed_fast_awq_to_gptq(qweight: torch.Tensor, qzeros: torch.Tensor):
    izeros = seed_apply_order(seed_unpack(qzeros, "column"), "column", REVERSE_AWQ_PACK_ORDER)
    iweights = seed_apply_order(seed_unpack(qweight, "column"), "column", REVERSE_AWQ_PACK_ORDER)
    return seed_pack(iweights, "row"), seed_pack(izeros - 1, "column")


def batched(fn, *arrays):
    """Run a 2-D reference over leading dimensions."""
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    lead = t[0].shape[:-2]
    if not lead:
        out = fn(*t)
        return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()
    flat = [x.reshape(-1, *x.shape[-2:]) for x in t]
    outs = [fn(*xs) for xs in zip(*flat)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack([o[i] for o in outs]).reshape(*lead, *outs[0][i].shape).numpy() for i in range(len(outs[0])))
    return torch.stack(outs).reshape(*lead, *outs[0].shape).numpy()


# --- value-by-value reference for any width, GPTQ's bit stream layout ---
def stream_pack_1d(values: list[int], bits: int) -> list[int]:
    """Pack values into 32-bit words, bit by bit: value i occupies stream bits [bits*i, bits*i + bits)."""
    n_words = len(values) * bits // 32
    words = [0] * n_words
    for i, v in enumerate(values):
        for b in range(bits):
            pos = bits * i + b
            if (v >> b) & 1:
                words[pos // 32] |= 1 << (pos % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def stream_pack(values: np.ndarray, direction: str, bits: int) -> np.ndarray:
    v = values if direction == "column" else np.swapaxes(values, -1, -2)
    lead, c = v.shape[:-1], v.shape[-1]
    rows = v.reshape(-1, c).tolist()
    words = np.array([stream_pack_1d([x & ((1 << bits) - 1) for x in r], bits) for r in rows], dtype=np.int32)
    words = words.reshape(*lead, c * bits // 32)
    return words if direction == "column" else np.swapaxes(words, -1, -2).copy()


def random_words(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def dequant_ref(q: np.ndarray, z: np.ndarray, s: torch.Tensor, g: np.ndarray) -> torch.Tensor:
    """(q - z[g]) * s[g] in float32, rounded once to the scales' dtype."""
    qt, zt = torch.from_numpy(q.astype(np.int64)), torch.from_numpy(z.astype(np.int64))
    gt = torch.from_numpy(g.astype(np.int64))
    w = (qt - zt.index_select(-2, gt)).to(torch.float32) * s.to(torch.float32).index_select(-2, gt)
    return w.to(s.dtype)


def fp_bits(t: torch.Tensor) -> np.ndarray:
    """A float tensor as its raw bits (bfloat16 has no NumPy dtype)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


def main() -> None:
    rng = np.random.default_rng(20261128)
    f: dict[str, np.ndarray] = {}

    # 4-bit value matrices: shapes the issue names, special values
    values = {
        "8x8": rng.integers(0, 16, (8, 8)),
        "16x8": rng.integers(0, 16, (16, 8)),
        "8x16": rng.integers(0, 16, (8, 16)),
        "zeros": np.zeros((16, 16), dtype=np.int64),
        "fifteens": np.full((16, 16), 15),
        "negative": rng.integers(-8, 16, (16, 24)),
        "batched": rng.integers(0, 16, (3, 16, 8)),
    }
    for name, v in values.items():
        v = v.astype(np.int8)
        for d in ("column", "row"):
            f[f"pack4/{name}/{d}/in"] = v
            f[f"pack4/{name}/{d}/out"] = batched(lambda x, d=d: seed_pack(x, d), v)
            f[f"order/{name}/{d}/in"] = v
            f[f"order/{name}/{d}/out"] = batched(lambda x, d=d: seed_apply_order(x, d), v)
            f[f"order_rev/{name}/{d}/out"] = batched(lambda x, d=d: seed_apply_order(x, d, REVERSE_AWQ_PACK_ORDER), v)

    # 4-bit words: random (half negative), all-zero, all-ones (top nibble set), batched
    words = {
        "8x8": random_words(rng, (8, 8)),
        "16x8": random_words(rng, (16, 8)),
        "8x16": random_words(rng, (8, 16)),
        "zeros": np.zeros((8, 8), dtype=np.int32),
        "minus_one": np.full((8, 8), -1, dtype=np.int32),
        "top_nibble": (random_words(rng, (16, 8)) | np.int32(-(2**31))),
        "batched": random_words(rng, (3, 16, 8)),
    }
    for name, w in words.items():
        for d in ("column", "row"):
            f[f"unpack4/{name}/{d}/in"] = w
            f[f"unpack4/{name}/{d}/out"] = batched(lambda x, d=d: seed_unpack(x, d), w)

    # AWQ -> GPTQ: (qweight (K, N/8), qzeros (K/G, N/8))
    z_with_zero = np.zeros((2, 2), dtype=np.int32)  # every zero-point 0
    awq_cases = {
        "8x8": (words["8x8"], random_words(rng, (1, 8))),
        "16x8": (words["16x8"], random_words(rng, (2, 8))),
        "8x16": (words["8x16"], random_words(rng, (1, 16))),
        "zeros": (np.zeros((16, 2), dtype=np.int32), np.zeros((2, 2), dtype=np.int32)),
        "fifteens": (np.full((16, 2), -1, dtype=np.int32), np.full((2, 2), -1, dtype=np.int32)),
        "zero_point_0": (random_words(rng, (16, 2)), z_with_zero),
        "top_nibble": (words["top_nibble"], random_words(rng, (2, 8)) | np.int32(-(2**31))),
        "batched": (words["batched"], random_words(rng, (3, 4, 8))),
        "group128": (random_words(rng, (256, 16)), random_words(rng, (2, 16))),
    }
    for name, (qw, qz) in awq_cases.items():
        gw, gz = batched(seed_fast_awq_to_gptq, qw, qz)
        f[f"awq/{name}/qweight"], f[f"awq/{name}/qzeros"] = qw, qz
        f[f"gptq/{name}/qweight"], f[f"gptq/{name}/qzeros"] = gw, gz
        # dequantization references in three float dtypes; group size from the shapes
        k, n = qw.shape[-2], qw.shape[-1] * 8
        groups = qz.shape[-2]
        q = batched(lambda x: seed_apply_order(seed_unpack(x), "column", REVERSE_AWQ_PACK_ORDER), qw).astype(np.int64)
        z = batched(lambda x: seed_apply_order(seed_unpack(x), "column", REVERSE_AWQ_PACK_ORDER), qz).astype(np.int64)
        g = np.arange(k) // (k // groups)
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            s = (torch.from_numpy(rng.standard_normal(qz.shape[:-2] + (groups, n))) * 0.01).to(dt)
            key = str(dt).removeprefix("torch.")
            f[f"dequant/{name}/{key}/scales"] = fp_bits(s)
            f[f"dequant/{name}/{key}/out"] = fp_bits(dequant_ref(q, z, s, g))

    # other widths: GPTQ layouts by the value-by-value reference (3-bit included)
    for bits in (2, 3, 4, 8):
        per = 32 if bits == 3 else 32 // bits
        for name, shape in (("small", (per, 2 * per)), ("batched", (2, 2 * per, per))):
            v = rng.integers(0, 1 << bits, shape).astype(np.int64)
            if name == "small":
                v[0, :] = (1 << bits) - 1  # every field set, top bits included
            for d in ("column", "row"):
                f[f"pack{bits}/{name}/{d}/in"] = v
                f[f"pack{bits}/{name}/{d}/out"] = stream_pack(v, d, bits)
        # zeros v1 <-> v2: per field modulo 2**bits, zero-point 0 included
        zv = rng.integers(0, 1 << bits, (4, 2 * per)).astype(np.int64)
        zv[:, 0] = 0
        zv[0, :] = 0
        f[f"zeros{bits}/v2"] = stream_pack(zv, "column", bits)
        f[f"zeros{bits}/v1"] = stream_pack((zv - 1) % (1 << bits), "column", bits)
        # GPTQ dequantization at this width, trivial and act-order g_idx
        k, n, groups = 2 * per * 4, per * 2, 4
        q = rng.integers(0, 1 << bits, (k, n))
        z = rng.integers(0, 1 << bits, (groups, n))
        s = (torch.from_numpy(rng.standard_normal((groups, n))) * 0.01).to(torch.float16)
        f[f"dq{bits}/qweight"] = stream_pack(q, "row", bits)
        f[f"dq{bits}/qzeros_v1"] = stream_pack((z - 1) % (1 << bits), "column", bits)
        f[f"dq{bits}/scales"] = fp_bits(s)
        f[f"dq{bits}/out"] = fp_bits(dequant_ref(q, z, s, np.arange(k) // (k // groups)))
        g_act = rng.permutation(np.arange(k) // (k // groups)).astype(np.int32)
        f[f"dq{bits}/g_idx_act"] = g_act
        f[f"dq{bits}/out_act"] = fp_bits(dequant_ref(q, z, s, g_act))

    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "golden.npz", **f)

    # a realistic layer: inputs from PCG64's stable raw stream, outputs by hash
    big = {}
    for name, (shape, zshape, seed) in {"layer_4096x1376": ((4096, 1376), (32, 1376), 1)}.items():
        qw, qz = raw_words(seed, shape), raw_words(seed + 1000, zshape)
        gw, gz = seed_fast_awq_to_gptq(torch.from_numpy(qw), torch.from_numpy(qz))
        big[name] = {
            "qweight_shape": list(shape), "qzeros_shape": list(zshape), "seed": seed, "zeros_seed": seed + 1000,
            "sha256_qweight": sha256(gw.numpy()), "sha256_qzeros": sha256(gz.numpy()),
        }
    (OUT / "golden_large.json").write_text(json.dumps(big, indent=1) + "\n")
    print(f"wrote {len(f)} arrays to {OUT / 'golden.npz'} and {len(big)} large case(s)")


if __name__ == "__main__":
    main()
