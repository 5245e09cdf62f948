"""On a CUDA machine: packq's torch CUDA path (Triton) and JAX GPU path, bit for bit against NumPy.

Random words in many shapes (single layers, stacked MoE experts, ragged tiles), int32 and uint32,
contiguous and not, through the public calls on CUDA tensors and on JAX GPU arrays; every result
must equal packq on NumPy (itself checked against the golden fixtures). Dequantization too: AWQ, and
GPTQ at 2, 3, 4 and 8 bits with v1 and v2 zeros, trivial and act-order g_idx, stacked experts,
float16, bfloat16 and float32 scales of every magnitude (float16 subnormals included), each result
compared with NumPy's: the float32 product (exact for 16-bit scales) rounded once to the scales' dtype
(bfloat16 through ml_dtypes), and NumPy's own float32 product for float32 scales. Poisoned outputs
are impossible to miss: every element is compared. Prints one JSON object; exit status 1 on any
difference. The range check of an act-order g_idx (made after the launch) is checked too: the kernels
read an out-of-range g_idx clamped, the public calls raise, and the device is sound after.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import packq
from packq.backends import torch as torch_backend

#: public torch calls whose g_idx range came from the kernel itself (triton_kernels.dequantize_gptq_checked)
RANGE_FROM_KERNEL = [0]

SHAPES = [(8, 8), (128, 16), (4096, 512), (11008, 512), (8, 64, 40), (16, 256, 96), (32, 8), (1024, 3)]


def main() -> int:
    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    assert torch_backend.triton_kernels() is not None, "Triton is not importable: the CUDA path would be the core"
    import jax

    gpu = jax.devices("gpu")[0]
    checked, failures = 0, []
    for shape in SHAPES:
        for group in (1, 8):
            qw = rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32)
            qz = rng.integers(-(2**31), 2**31, (*shape[:-2], max(1, shape[-2] // (8 * group)), shape[-1]),
                              dtype=np.int64).astype(np.int32)
            want_w, want_z = packq.fast_awq_to_gptq(qw, qz)
            back_w, back_z = packq.gptq_to_awq(want_w, want_z)
            for layout in ("contiguous", "transposed", "uint32"):
                tw, tz = torch.from_numpy(qw).to(dev), torch.from_numpy(qz).to(dev)
                if layout == "transposed":
                    tw, tz = tw.mT.contiguous().mT, tz.mT.contiguous().mT
                elif layout == "uint32":
                    tw, tz = tw.view(torch.uint32), tz.view(torch.uint32)
                w, z = packq.fast_awq_to_gptq(tw, tz)
                w2, z2 = packq.gptq_to_awq(w, z)
                for name, got, want in (("to_gptq w", w, want_w), ("to_gptq z", z, want_z),
                                        ("to_awq w", w2, back_w), ("to_awq z", z2, back_z)):
                    checked += 1
                    if got.device.type != "cuda" or not np.array_equal(got.cpu().numpy(), want):
                        failures.append(f"torch {shape} {layout} {name}")
            jw, jz = jax.device_put(qw, gpu), jax.device_put(qz, gpu)
            for name, got, want in zip(("jax w", "jax z"), packq.fast_awq_to_gptq(jw, jz), (want_w, want_z)):
                checked += 1
                if not np.array_equal(np.asarray(got), want):
                    failures.append(f"jax {shape} {name}")
    from packq.backends import pallas_kernels as pk

    pallas_traced = _count_pallas_traces()
    dq_checked, dq_failures = dequantization(rng, dev, gpu)
    ao_checked, ao_failures = act_order_range(rng, dev, gpu)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "jax": jax.__version__,
                      "triton": __import__("triton").__version__, "arrays_checked": checked,
                      "failures": failures, "dequantized_arrays_checked": dq_checked,
                      "dequantization_failures": dq_failures,
                      "pallas_kernels_traced": sorted(pallas_traced),
                      "jax_pallas_use_mosaic_gpu_default": getattr(jax.config, "jax_pallas_use_mosaic_gpu", None),
                      "act_order_range_checks": ao_checked, "act_order_range_failures": ao_failures,
                      "torch_range_from_the_kernel": torch_backend.CHECK_IN_KERNEL,
                      "torch_calls_with_the_range_from_the_kernel": RANGE_FROM_KERNEL[0],
                      "pallas_3bit_act_order_zeros": pk.ZEROS3[0]},
                     indent=1))
    failures += dq_failures + ao_failures
    return 1 if failures else 0


def _count_pallas_traces() -> set[str]:
    """The Pallas kernels the public JAX calls trace (each once per shape): so the JSON says which variants the
    kernels computed, and which XLA did (ragged shapes, groups the tiles cross without act-order)."""
    from packq.backends import pallas_kernels as pk

    seen: set[str] = set()
    real_gptq, real_awq = pk.dequantize_gptq, pk.dequantize_awq

    def gptq(qw, qz, s, g_idx=None, *, bits, zeros, experts=1, interpret=False, zeros3=None):
        zeros3 = zeros3 or pk.ZEROS3[0]
        seen.add(f"gptq {bits}-bit act_order={g_idx is not None} experts={experts} {tuple(qw.shape)}"
                 + (f" zeros3={zeros3}" if bits == 3 and g_idx is not None else ""))
        return real_gptq(qw, qz, s, g_idx, bits=bits, zeros=zeros, experts=experts, interpret=interpret, zeros3=zeros3)

    def awq(qw, qz, s, interpret=False):
        seen.add(f"awq {tuple(qw.shape)}")
        return real_awq(qw, qz, s, interpret=interpret)

    pk.dequantize_gptq, pk.dequantize_awq = gptq, awq
    return seen


def act_order_range(rng: np.random.Generator, dev, gpu) -> tuple[int, list[str]]:
    """The range check of g_idx, made after the launch (torch CUDA, JAX GPU): the kernels alone read an
    out-of-range g_idx clamped (their bits are NumPy's on the clamped g_idx), the public calls raise the
    ValueError naming g_idx, and the device is still sound afterwards (the next call's bits are right)."""
    import jax

    from packq.backends import pallas_kernels as pk
    from packq.backends import triton_kernels as tk

    checked, failures = 0, []
    k, n, groups = 4096, 1024, 32  # g_idx over 4 of the range program's chunks
    real_checked = tk.dequantize_gptq_checked

    def counted(*a, **kw):
        RANGE_FROM_KERNEL[0] += 1
        return real_checked(*a, **kw)

    tk.dequantize_gptq_checked = counted
    for bits in (2, 3, 4, 8):
        gw = rng.integers(-(2**31), 2**31, (k * bits // 32, n), dtype=np.int64).astype(np.int32)
        gz = rng.integers(-(2**31), 2**31, (groups, n * bits // 32), dtype=np.int64).astype(np.int32)
        scales = (rng.standard_normal((groups, n)) * 0.01).astype(np.float16)
        good = rng.permutation(np.arange(k) // (k // groups)).astype(np.int32)
        wild = good.copy()
        wild[rng.integers(0, k, 64)] = rng.integers(-(2**20), 2**20, 64)
        want_clamped = reference(packq.dequantize_gptq, "float16", gw, gz, scales, np.clip(wild, 0, groups - 1), bits=bits,
                                 zeros="v1")
        want = reference(packq.dequantize_gptq, "float16", gw, gz, scales, good, bits=bits, zeros="v1")
        tw, tz, ts = torch.from_numpy(gw).to(dev), torch.from_numpy(gz).to(dev), torch.from_numpy(scales).to(dev)
        jw, jz, js = (jax.device_put(a, gpu) for a in (gw, gz, scales))
        # torch: the range from the kernel itself (the default), and from a reduction of its own; JAX: every way the
        # 3-bit act-order kernel takes its zero-points
        ways = [("torch", dt, w) for dt in (np.int32, np.int64) for w in ("in kernel", "reduction")]
        ways += [("jax", np.int32, z3) for z3 in (pk.ZEROS3 if bits == 3 else pk.ZEROS3[:1])]
        for lib, dt, way in ways:
            tag = f"{lib} {bits}-bit g_idx {np.dtype(dt).name} ({way})"
            torch_backend.CHECK_IN_KERNEL = way != "reduction"
            if lib == "torch":
                got = tk.dequantize_gptq(tw, tz, ts, torch.from_numpy(wild.astype(dt)).to(dev), bits, "v1")
                got = _bits_of(got.cpu().view(torch.int16).numpy())
            else:
                got = _bits_of(np.asarray(pk.dequantize_gptq(jw, jz, js, jax.device_put(wild, gpu), bits=bits,
                                                             zeros="v1", zeros3=way)))
            checked += 1
            if not np.array_equal(got, want_clamped):
                failures.append(f"{tag}: kernel on an out-of-range g_idx differs from NumPy on the clamped one")
            bad = torch.from_numpy(wild.astype(dt)).to(dev) if lib == "torch" else jax.device_put(wild, gpu)
            args = (tw, tz, ts) if lib == "torch" else (jw, jz, js)
            try:
                packq.dequantize_gptq(*args, bad, bits=bits)
                failures.append(f"{tag}: an out-of-range g_idx did not raise")
            except ValueError as e:
                expected = (f"g_idx must hold values in [0, {groups - 1}] (indices of the {groups} groups of qzeros), "
                            f"got values in [{wild.min()}, {wild.max()}]")
                if str(e) != expected:
                    failures.append(f"{tag}: raised {e!r}")
            okg = torch.from_numpy(good.astype(dt)).to(dev) if lib == "torch" else jax.device_put(good, gpu)
            after = packq.dequantize_gptq(*args, okg, bits=bits)
            after = _bits_of(after.cpu().view(torch.int16).numpy()) if lib == "torch" else _bits_of(np.asarray(after))
            checked += 1
            if not np.array_equal(after, want):
                failures.append(f"{tag}: the call after the refused one differs from NumPy")
        torch_backend.CHECK_IN_KERNEL = True
        # the kernel's range behind a long queue (the wait blocks on the kernel once its spin is over), and a call
        # whose wait never ran (its slot stays busy until its kernel ends: the next call's range is its own)
        tbad, tgood = torch.from_numpy(wild).to(dev), torch.from_numpy(good).to(dev)
        torch.cuda._sleep(200_000_000)  # about 0.1 s of the GPU's clock
        try:
            packq.dequantize_gptq(tw, tz, ts, tbad, bits=bits)
            failures.append(f"torch {bits}-bit behind a long queue: an out-of-range g_idx did not raise")
        except ValueError as e:
            if f"got values in [{wild.min()}, {wild.max()}]" not in str(e):
                failures.append(f"torch {bits}-bit behind a long queue: raised {e!r}")
        checked += 1
        torch.cuda._sleep(50_000_000)
        tk.dequantize_gptq_checked(tw, tz, ts, tbad, bits, "v1")  # never waited for
        out, wait = tk.dequantize_gptq_checked(tw, tz, ts, tgood, bits, "v1")
        got_range = wait()
        checked += 1
        if got_range != (int(good.min()), int(good.max())) or not np.array_equal(_bits_of(out.cpu().view(torch.int16).numpy()),
                                                                                 want):
            failures.append(f"torch {bits}-bit after an unwaited call: range {got_range} or its bits wrong")
    torch.cuda.synchronize()
    return checked, failures


#: (lead, K, N, groups): layers with groups of 128 (the kernels' one-group tiles), per-channel (one group),
#: groups of 32 and 48 (tiles across groups), stacked experts, ragged column tiles
DQ_SHAPES = [((), 4096, 1024, 32), ((), 1024, 544, 1), ((), 768, 768, 16), ((8,), 256, 512, 2), ((2, 3), 128, 96, 4)]
DTYPES = ("float16", "bfloat16", "float32")


def _bits_of(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


def reference(dequantize, dtype: str, *args, **kw) -> np.ndarray:
    """NumPy's dequantization in the scales' dtype, as the bits of it: float32 scales through packq on NumPy;
    16-bit ones through packq's NumPy float32 result (exact: a 9-bit integer times a 16-bit float) rounded
    once to nearest even (ml_dtypes for bfloat16)."""
    import ml_dtypes

    *words, scales = args[:3]
    f32 = dequantize(*words, scales.astype(np.float32), *args[3:], **kw)
    if dtype == "float32":
        return _bits_of(f32)
    return _bits_of(f32.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16))


def dequantization(rng: np.random.Generator, dev, gpu) -> tuple[int, list[str]]:
    """Every dequantization variant on torch CUDA and JAX GPU against NumPy; (arrays checked, failures)."""
    import jax
    import ml_dtypes

    checked, failures = 0, []
    np_dtypes = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
    t_dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

    def words(*shape):
        return rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32)

    def compare(what, got_torch, got_jax, want):
        nonlocal checked
        for lib, got in (("torch", got_torch), ("jax", got_jax)):
            if got is None:
                continue
            checked += 1
            if lib == "torch":
                ok = got.device.type == "cuda" and np.array_equal(_bits_of(got.cpu().view(
                    torch.int32 if got.dtype == torch.float32 else torch.int16).numpy()), want)
            else:
                ok = np.array_equal(_bits_of(np.asarray(got)), want)
            if not ok:
                failures.append(f"{lib} {what}")

    import os

    # PACKQ_CHECK_SHAPES="4": only these DQ_SHAPES (by index), to finish a check a time limit cut short
    picked = os.environ.get("PACKQ_CHECK_SHAPES")
    shapes = [DQ_SHAPES[int(i)] for i in picked.split(",")] if picked else DQ_SHAPES
    for lead, k, n, groups in shapes:
        print(f"dequantization {lead} {k} x {n}, {groups} groups: {checked} arrays checked so far, "
              f"{len(failures)} failures", file=sys.stderr, flush=True)
        for dtype in DTYPES:
            s32 = (rng.standard_normal((*lead, groups, n)) * np.exp2(rng.integers(-20, 4, (*lead, groups, n))))
            s32 = s32.astype(np.float32)
            scales = s32.astype(np_dtypes[dtype])
            # the same bits on every side: torch's scales are NumPy's, reinterpreted
            ts = torch.from_numpy(scales.view(np.int32 if dtype == "float32" else np.int16)).view(t_dtypes[dtype]).to(dev)
            js = jax.device_put(scales, gpu)
            # AWQ
            aw, az = words(*lead, k, n // 8), words(*lead, groups, n // 8)
            want = reference(packq.dequantize_awq, dtype, aw, az, scales)
            compare(f"awq {lead} {k}x{n} g{groups} {dtype}",
                    packq.dequantize_awq(torch.from_numpy(aw).to(dev), torch.from_numpy(az).to(dev), ts),
                    packq.dequantize_awq(jax.device_put(aw, gpu), jax.device_put(az, gpu), js), want)
            for bits in (2, 3, 4, 8):
                if n * bits % 32:
                    continue
                gw, gz = words(*lead, k * bits // 32, n), words(*lead, groups, n * bits // 32)
                for zeros in ("v1", "v2") if dtype == "float16" else ("v1",):
                    for act in (False, True):
                        g_idx = rng.permutation(np.arange(k) // (k // groups)).astype(np.int32) if act else None
                        want = reference(packq.dequantize_gptq, dtype, gw, gz, scales, g_idx, bits=bits, zeros=zeros)
                        # int64 (torch's default) and int32 indices, read as they are by the kernel
                        tdt = np.int64 if (bits + len(lead)) % 2 else np.int32
                        tg = None if g_idx is None else torch.from_numpy(g_idx.astype(tdt)).to(dev)
                        jg = None if g_idx is None else jax.device_put(g_idx, gpu)
                        compare(f"gptq {bits}-bit {zeros} act={act} {lead} {k}x{n} g{groups} {dtype}",
                                packq.dequantize_gptq(torch.from_numpy(gw).to(dev), torch.from_numpy(gz).to(dev), ts, tg,
                                                      bits=bits, zeros=zeros),
                                packq.dequantize_gptq(jax.device_put(gw, gpu), jax.device_put(gz, gpu), js, jg,
                                                      bits=bits, zeros=zeros), want)
                        if act and bits == 3:  # the Pallas kernel's every way of taking the zero-points (the public
                            # call above took the default), called as the JAX backend calls it
                            from packq.backends import pallas_kernels as pk

                            if pk.supported(k, n, groups, pk.BN, True):
                                experts = int(np.prod(lead))
                                for z3 in pk.ZEROS3:
                                    got = pk.dequantize_gptq(
                                        jax.device_put(gw.reshape(-1, n), gpu), jax.device_put(gz.reshape(-1, gz.shape[-1]), gpu),
                                        jax.device_put(scales.reshape(-1, n), gpu), jg, bits=3, zeros=zeros, experts=experts,
                                        zeros3=z3)
                                    compare(f"gptq 3-bit {zeros} act=True pallas zeros3={z3} {lead} {k}x{n} g{groups} {dtype}",
                                            None, got.reshape(*lead, k, n), want)
    # negative control: a corrupted result fails the same comparison
    aw, az = words(128, 8), words(1, 8)
    sc = np.full((1, 64), 0.1, np.float16)
    bad = packq.dequantize_awq(torch.from_numpy(aw).to(dev), torch.from_numpy(az).to(dev), torch.from_numpy(sc).to(dev))
    bad.view(torch.int16)[3, 5] ^= 1
    before = len(failures)
    compare("negative control", bad, None, reference(packq.dequantize_awq, "float16", aw, az, sc))
    if len(failures) != before + 1:
        failures.append("negative control: a corrupted result passed the check")
    else:
        failures.pop()
        checked -= 1
    return checked, failures


if __name__ == "__main__":
    sys.exit(main())
