"""Time AWQ -> GPTQ weight conversion: packq (NumPy, JAX) against the seed's torch code and a plain copy.

    python benchmarks/bench.py cpu [--quick]   # this machine: medians, ratios, CSV, plot
    python benchmarks/bench.py gpu             # on a CUDA machine: JAX on the GPU, seed torch on the GPU,
                                               # device-to-device copies; timed with device events
    python benchmarks/bench.py gpu-dequant     # on a CUDA machine: dequantization (torch CUDA, JAX) against
                                               # a device copy of its float16 output

Every implementation converts the same words in one run and its result is checked against packq's
NumPy result before it is timed. Ratios are to the plain copy of the same bytes (read once, written
once), the floor for a conversion that moves no arithmetic.

On the CPU, NumPy runs with and without numba, and JAX runs twice: with JAX's default asynchronous
dispatch, where XLA allocates each output on a worker thread and the caller frees it, so that glibc
may hand every call fresh pages (one page fault per 4 KiB, counted in the last column), and in a
subprocess with JAX_CPU_ENABLE_ASYNC_DISPATCH=false, where the pages of the last output are reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]
from _words import raw_words  # noqa: E402

import packq  # noqa: E402

SHAPES = {  # (K, N) of Llama-2 layers
    "7B q/k/v/o 4096x4096": (4096, 4096),
    "7B gate/up 4096x11008": (4096, 11008),
    "7B down 11008x4096": (11008, 4096),
    "70B gate/up 8192x28672": (8192, 28672),
}
RESULTS = Path(__file__).parent / "results"


def timed(fn, repeat: int, warmup: int = 1) -> tuple[float, float]:
    """Median milliseconds of ``repeat`` calls, and the page faults per call (fresh pages the kernel had to map)."""
    for _ in range(warmup):
        fn()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeat
    return 1e3 * statistics.median(times), faults


def report(rows: list[dict], label: str, k: int, n: int, mb: float, t: dict[str, float], floor: str, where: str,
           faults: dict[str, float] | None = None) -> None:
    """Append one layer's timings to ``rows`` as ratios to ``floor`` and print them."""
    print(f"{label} ({mb:.1f} MB packed) {where}")
    for impl, ms in t.items():
        f = (faults or {}).get(impl)
        rows.append({"layer": label, "K": k, "N": n, "MB": round(mb, 1), "impl": impl, "median_ms": round(ms, 4),
                     "x_copy": round(ms / t[floor], 2), "GB_s": round(2 * mb / ms, 2),
                     "seed_over_this": round(t["seed torch"] / ms, 1), "faults_per_call": "" if f is None else round(f)})
        print(f"  {impl:32s} {ms:9.4f} ms  {2 * mb / ms:8.1f} GB/s  {ms / t[floor]:7.2f}x copy  "
              f"seed is {t['seed torch'] / ms:7.1f}x slower" + ("" if f is None else f"  {f:6.0f} page faults/call"))


def jax_ms(fn, arg, repeat: int = 50) -> float:
    """Mean of back-to-back launches with one wait (median of 5 batches).

    The host dispatch overlaps the device work, so the mean per call is the device
    time once the kernel is longer than the dispatch.
    """
    import jax

    for _ in range(3):
        jax.block_until_ready(fn(arg))
    means = []
    for _ in range(5):
        t = time.perf_counter()
        outs = [fn(arg) for _ in range(repeat)]
        jax.block_until_ready(outs)
        means.append((time.perf_counter() - t) / repeat * 1e3)
        del outs
    return statistics.median(means)


def cuda_ms(fn, repeat: int = 50) -> float:
    """Median milliseconds of single calls between CUDA events: the host's launch included, the GPU idle meanwhile."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back(fn, repeat: int = 100) -> float:
    """Mean of back-to-back calls with one wait (median of 5): the device time once a launch is shorter than the kernel."""
    import torch

    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    means = []
    for _ in range(5):
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) / repeat)
    return statistics.median(means)


def graph_ms(fn, calls: int = 20) -> float:
    """Device time of one call: ``calls`` calls captured in a CUDA graph, the median of 5 replays over ``calls``.
    The host's launch and packq's argument checks are out of it, which back-to-back timing cannot leave out
    where a call's host time exceeds its kernel's (small layers)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def seed_weight(torch, qweight):
    """The seed's weight path (LoRAX fast_awq_to_gptq without the zeros)."""
    from make_fixtures import REVERSE_AWQ_PACK_ORDER, seed_apply_order, seed_pack, seed_unpack

    return seed_pack(seed_apply_order(seed_unpack(qweight, "column"), "column", REVERSE_AWQ_PACK_ORDER), "row")


def cpu_jax(quick: bool) -> dict[str, dict[str, tuple[float, float]]]:
    """JAX rows only: (median ms, page faults per call) by layer and implementation."""
    import jax
    import jax.numpy as jnp

    out = {}
    for label, (k, n) in SHAPES.items():
        qw = raw_words(k * 7 + n, (k, n // 8))
        ref = packq.fast_awq_to_gptq(qw, np.zeros((1, n // 8), np.int32))[0]
        x, z = jnp.asarray(qw), jnp.zeros((1, n // 8), jnp.int32)
        conv = jax.jit(lambda a, b: packq.fast_awq_to_gptq(a, b)[0])
        touch = jax.jit(lambda a: a ^ 1)  # reads and writes every byte once, like a copy (an identity would be elided)
        assert np.array_equal(np.asarray(conv(x, z)), ref)
        repeat = 5 if quick else 15
        out[label] = {"copy (jax jit)": timed(lambda: touch(x).block_until_ready(), repeat, 3),
                      "packq jax (jit)": timed(lambda: conv(x, z).block_until_ready(), repeat, 3)}
    return out


#: the NumPy backend's routes timed on the CPU: its C kernels (the default where built), numba's, its ufuncs
ROUTES = {"C": "C kernels", "numba": "numba, no C", "ufuncs": "ufuncs, no C, no numba"}


def cpu(quick: bool) -> list[dict]:
    import torch

    from packq.backends import numpy as numpy_backend

    torch.set_num_threads(2)
    # JAX with synchronous CPU dispatch, in a process of its own (the setting is read once, at start-up):
    # then XLA allocates every output on the calling thread, where glibc reuses the pages of the last one
    env = {**os.environ, "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"}
    cmd = [sys.executable, __file__, "cpu-jax"] + (["--quick"] if quick else [])
    sync = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    jax_rows = cpu_jax(quick)
    rows = []
    for label, (k, n) in SHAPES.items():
        qw = raw_words(k * 7 + n, (k, n // 8))
        zeros = raw_words(k + n, (k // 128, n // 8))
        mb = qw.nbytes / 1e6
        ref = packq.fast_awq_to_gptq(qw, zeros)[0]
        tq = torch.from_numpy(qw)
        seed_repeat = 1 if (quick or k * n > 10**8) else 3
        assert np.array_equal(seed_weight(torch, tq).numpy(), ref)
        repeat = 5 if quick else 15

        def routes(r: str) -> None:  # the NumPy backend's kernels, fastest first: C, then numba, then the ufuncs
            os.environ["PACKQ_CEXT"] = "1" if r == "C" else "0"
            os.environ["PACKQ_NUMBA"] = "1" if r == "numba" else "0"
            numpy_backend.c_kernels.cache_clear()  # both are read once a process (functools.cache)
            numpy_backend.numba_kernels.cache_clear()
            # the row is named for the route it times: a cached choice once timed the C kernels in all three rows
            assert (numpy_backend.c_kernels() is not None) == (r == "C"), r
            assert (numpy_backend.numba_kernels() is not None) == (r == "numba"), r

        def numpy_path(r: str) -> tuple[float, float]:
            routes(r)
            assert np.array_equal(packq.fast_awq_to_gptq(qw, zeros)[0], ref)
            return timed(lambda: packq.fast_awq_to_gptq(qw, zeros), repeat)

        def torch_path(r: str) -> tuple[float, float]:
            routes(r)
            tz = torch.from_numpy(zeros)
            assert np.array_equal(packq.fast_awq_to_gptq(tq, tz)[0].numpy(), ref)
            return timed(lambda: packq.fast_awq_to_gptq(tq, tz), repeat)

        m = {
            "copy (numpy)": timed(lambda: qw.copy(), repeat),
            **{f"packq numpy ({name})": numpy_path(r) for r, name in ROUTES.items()},
            **{f"packq torch cpu ({name})": torch_path(r) for r, name in ROUTES.items()},
            **{f"{impl}, async dispatch": v for impl, v in jax_rows[label].items()},
            **{f"{impl}, sync dispatch": tuple(v) for impl, v in sync[label].items()},
            "seed torch": timed(lambda: seed_weight(torch, tq), seed_repeat),
        }
        os.environ.pop("PACKQ_CEXT")
        os.environ.pop("PACKQ_NUMBA")
        numpy_backend.c_kernels.cache_clear()
        numpy_backend.numba_kernels.cache_clear()
        report(rows, label, k, n, mb, {i: v[0] for i, v in m.items()}, "copy (numpy)", f"threads={numpy_backend.threads()}",
               {i: v[1] for i, v in m.items()})
    return rows


def gpu() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from packq.backends import jax as jax_backend
    from packq.formats import awq

    dev = torch.device("cuda")
    rows = []

    warm = torch.empty(1 << 28, dtype=torch.uint8, device=dev)  # bring the GPU to its clocks before timing
    t_end = time.perf_counter() + 2
    while time.perf_counter() < t_end:
        warm.add_(1)
    torch.cuda.synchronize()
    for label, (k, n) in SHAPES.items():
        qw = raw_words(k * 7 + n, (k, n // 8))
        zeros = raw_words(k + n, (k // 128, n // 8))
        mb = qw.nbytes / 1e6
        ref, ref_z = packq.fast_awq_to_gptq(qw, zeros)
        x = jax.device_put(jnp.asarray(qw), jax.devices("gpu")[0])
        z = jax.device_put(jnp.asarray(zeros), jax.devices("gpu")[0])
        conv = jax.jit(lambda a: packq.fast_awq_to_gptq(a, z)[0])
        both = jax.jit(packq.fast_awq_to_gptq)  # weights and zeros, wrapped in the caller's jit
        eager = lambda a: packq.fast_awq_to_gptq(a, z)  # noqa: E731  as users call it: no jit of their own
        core = jax.jit(lambda a: awq.weight_to_gptq(jnp, a))  # the array-API composition, traced as is
        byts = jax.jit(lambda a: jax_backend.weight_to_gptq_bytes(jnp, a))  # the CPU fast path
        jcopy = jax.jit(lambda a: a ^ 1)
        for f in (conv, core, byts):
            assert np.array_equal(np.asarray(f(x)), ref)
        tq, tz = torch.from_numpy(qw).to(dev), torch.from_numpy(zeros).to(dev)
        assert np.array_equal(seed_weight(torch, tq).cpu().numpy(), ref)
        got_w, got_z = packq.fast_awq_to_gptq(tq, tz)
        assert np.array_equal(got_w.cpu().numpy(), ref) and np.array_equal(got_z.cpu().numpy(), ref_z)
        for got in (*eager(x), *both(x, z)):
            assert np.array_equal(np.asarray(got), ref if got.shape == ref.shape else ref_z)
        t = {
            "copy (torch d2d)": cuda_ms(lambda: tq.clone()),
            "packq torch cuda (triton, w+z)": cuda_ms(lambda: packq.fast_awq_to_gptq(tq, tz)),
            "copy (torch d2d), back to back": back_to_back(lambda: tq.clone()),
            "packq torch cuda, back to back": back_to_back(lambda: packq.fast_awq_to_gptq(tq, tz)),
            "packq jax eager (w+z)": jax_ms(eager, x),
            "packq jax jit-wrapped (w+z)": jax_ms(lambda a: both(a, z), x),
            "copy (jax, x ^ 1)": jax_ms(jcopy, x),
            "packq jax (jit)": jax_ms(conv, x),
            "core composition (jit)": jax_ms(core, x),
            "byte formulation (jit)": jax_ms(byts, x),
            "seed torch": cuda_ms(lambda: seed_weight(torch, tq), 20),
        }
        report(rows, label, k, n, mb, t, "copy (torch d2d)", f"on {torch.cuda.get_device_name()}")
    return rows


def gpu_dequant(layers: str | None = None) -> list[dict]:
    """Dequantization on the GPU, float16 scales and output, group size 128: torch CUDA (Triton) and JAX, each
    checked against NumPy first, against a device copy of the float16 output (its floor moves more bytes than
    dequantization does: the copy reads and writes the output, dequantization reads words and writes it)."""
    import jax
    import jax.numpy as jnp
    import torch

    from packq.backends import jax as jax_backend
    from packq.backends import torch as torch_backend
    from packq.formats import gptq

    dev, gpu = torch.device("cuda"), jax.devices("gpu")[0]
    warm = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    t_end = time.perf_counter() + 2
    while time.perf_counter() < t_end:
        warm.add_(1)
    torch.cuda.synchronize()
    rows = []
    rng = np.random.default_rng(0)
    for label, (k, n) in SHAPES.items():
        if layers and layers not in label:
            continue
        groups = k // 128
        scales = (rng.standard_normal((groups, n)) * 0.01).astype(np.float16)
        aw, az = raw_words(k * 7 + n, (k, n // 8)), raw_words(k + n, (groups, n // 8))
        want = packq.dequantize_awq(aw, az, scales)
        t_aw, t_az, t_s = (torch.from_numpy(a).to(dev) for a in (aw, az, scales))
        j_aw, j_az, j_s = (jax.device_put(a, gpu) for a in (aw, az, scales))
        out = torch.from_numpy(want).to(dev)
        t: dict[str, float] = {}

        def check(got, ref) -> None:
            got = got.cpu().numpy() if hasattr(got, "cpu") else np.asarray(got)
            assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()

        check(packq.dequantize_awq(t_aw, t_az, t_s), want)
        t["copy of the float16 output (torch d2d), back to back"] = back_to_back(lambda: out.clone(), 20)
        try:  # device time alone, in CUDA graphs
            t["copy of the float16 output (torch d2d), CUDA graph"] = graph_ms(lambda: out.clone())
            t["torch cuda awq (triton), CUDA graph"] = graph_ms(lambda: packq.dequantize_awq(t_aw, t_az, t_s))
            gw4, gz4 = (torch.from_numpy(a).to(dev) for a in packq.fast_awq_to_gptq(aw, az))
            check(packq.dequantize_gptq(gw4, gz4, t_s), want)
            t["torch cuda gptq 4-bit (triton), CUDA graph"] = graph_ms(lambda: packq.dequantize_gptq(gw4, gz4, t_s))
        except Exception as e:  # noqa: BLE001  reported; the back-to-back rows stand
            print(f"  CUDA graph timing: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
        t["copy of the float16 output (jax, -x)"] = jax_ms(jax.jit(lambda a: -a), jax.device_put(want, gpu))
        t["torch cuda awq (triton), back to back"] = back_to_back(lambda: packq.dequantize_awq(t_aw, t_az, t_s), 20)
        t["torch cuda awq (triton), one call"] = cuda_ms(lambda: packq.dequantize_awq(t_aw, t_az, t_s), 20)
        spread = jax.jit(lambda a, b, c: jax_backend.dequantize_awq_spread(jnp, a, b, c))
        core = jax.jit(lambda a, b, c: gptq.dequantize_awq(jnp, a, b, c))
        for name, f in (("jax awq eager (public call)", packq.dequantize_awq), ("jax awq spread (jit)", spread),
                        ("jax awq core (jit)", core)):
            check(f(j_aw, j_az, j_s), want)
            t[name] = jax_ms(lambda a: f(a, j_az, j_s), j_aw)
        try:  # Pallas kernels (Triton underneath), measured beside XLA's fusion
            from packq.backends import pallas_kernels as pk

            check(pk.dequantize_awq(j_aw, j_az, j_s), want)
            t["jax awq pallas"] = jax_ms(lambda a: pk.dequantize_awq(a, j_az, j_s), j_aw)
        except Exception as e:  # noqa: BLE001  reported, not fatal: the XLA rows stand
            print(f"  pallas kernels: {type(e).__name__}: {str(e)[:300]}")
        from packq.backends import triton_kernels as tk

        host = torch.empty(2, dtype=torch.int32, pin_memory=True)
        slot = torch.zeros(3, dtype=torch.int64, pin_memory=True)  # where the act-order kernel writes g_idx's range
        for bits in (4, 3, 2, 8):
            gw, gz = raw_words(k * bits + n, (k * bits // 32, n)), raw_words(k + n + bits, (groups, n * bits // 32))
            t_gw, t_gz = torch.from_numpy(gw).to(dev), torch.from_numpy(gz).to(dev)
            j_gw, j_gz = jax.device_put(gw, gpu), jax.device_put(gz, gpu)
            variants = [(None, ""), (rng.permutation(np.arange(k) // 128).astype(np.int32), " act-order")]
            for g_idx, what in variants:
                ref = packq.dequantize_gptq(gw, gz, scales, g_idx, bits=bits)
                tg = None if g_idx is None else torch.from_numpy(g_idx).to(dev)
                jg = None if g_idx is None else jax.device_put(g_idx, gpu)
                check(packq.dequantize_gptq(t_gw, t_gz, t_s, tg, bits=bits), ref)
                t[f"torch cuda gptq {bits}-bit{what} (triton), back to back"] = back_to_back(
                    lambda: packq.dequantize_gptq(t_gw, t_gz, t_s, tg, bits=bits), 20)
                if tg is not None:  # the older range check: a reduction and a copy of its own before the kernel
                    torch_backend.CHECK_IN_KERNEL = False
                    try:
                        check(packq.dequantize_gptq(t_gw, t_gz, t_s, tg, bits=bits), ref)
                        t[f"torch cuda gptq {bits}-bit{what} (triton), back to back, range by a reduction of its own"] = (
                            back_to_back(lambda: packq.dequantize_gptq(t_gw, t_gz, t_s, tg, bits=bits), 20))
                    finally:
                        torch_backend.CHECK_IN_KERNEL = True
                try:  # device time alone; act-order: the public call's device work (min/max, its copy, the kernel)
                    if tg is None:
                        t[f"torch cuda gptq {bits}-bit (triton), CUDA graph, raw words"] = graph_ms(
                            lambda: packq.dequantize_gptq(t_gw, t_gz, t_s, None, bits=bits))
                    else:
                        def device_work():  # the older path's
                            both = torch.empty(2, dtype=tg.dtype, device=dev)
                            torch.aminmax(tg, out=(both[0], both[1]))
                            host.copy_(both, non_blocking=True)
                            return tk.dequantize_gptq(t_gw, t_gz, t_s, tg, bits, "v1")

                        def in_kernel():  # what the public call queues now: the kernel, one program writing the range
                            return tk._dequantize_gptq(t_gw, t_gz, t_s, tg, bits, "v1", slot)

                        check(device_work(), ref)
                        slot[2] = 0
                        check(in_kernel(), ref)
                        torch.cuda.synchronize()
                        assert slot.tolist() == [int(g_idx.min()), int(g_idx.max()), 1], slot
                        t[f"torch cuda gptq {bits}-bit act-order (triton), CUDA graph of its device work"] = graph_ms(in_kernel)
                        t[f"torch cuda gptq {bits}-bit act-order (triton), CUDA graph of its device work, range by a "
                          "reduction of its own"] = graph_ms(device_work)
                        t[f"torch cuda gptq {bits}-bit act-order (triton), CUDA graph of the kernel alone (no range)"] = (
                            graph_ms(lambda: tk.dequantize_gptq(t_gw, t_gz, t_s, tg, bits, "v1")))
                except Exception as e:  # noqa: BLE001  reported; the back-to-back rows stand
                    print(f"  CUDA graph timing: {type(e).__name__}: {str(e)[:300]}")
                check(packq.dequantize_gptq(j_gw, j_gz, j_s, jg, bits=bits), ref)
                t[f"jax gptq {bits}-bit{what} eager (public call)"] = jax_ms(
                    lambda a: packq.dequantize_gptq(a, j_gz, j_s, jg, bits=bits), j_gw)
                if jg is not None and bits == 4:  # each call a new g_idx array: its range reduced and read back each time
                    t[f"jax gptq {bits}-bit{what} eager (public call, a new g_idx array each call)"] = jax_ms(
                        lambda a: packq.dequantize_gptq(a, j_gz, j_s, jg + 0, bits=bits), j_gw)
                try:  # the Pallas kernel alone (under jit), where the tiles fit
                    from packq.backends import pallas_kernels as pk

                    check(pk.dequantize_gptq(j_gw, j_gz, j_s, jg, bits=bits, zeros="v1"), ref)
                    t[f"jax gptq {bits}-bit{what} pallas"] = jax_ms(
                        lambda a: pk.dequantize_gptq(a, j_gz, j_s, jg, bits=bits, zeros="v1"), j_gw)
                    if jg is not None and bits == 3:  # every way of giving the kernel its zero-points
                        for z3 in pk.ZEROS3:
                            check(pk.dequantize_gptq(j_gw, j_gz, j_s, jg, bits=3, zeros="v1", zeros3=z3), ref)
                            t[f"jax gptq 3-bit act-order pallas, zeros3={z3}"] = jax_ms(
                                lambda a, z3=z3: pk.dequantize_gptq(a, j_gz, j_s, jg, bits=3, zeros="v1", zeros3=z3), j_gw)
                    if jg is not None:  # the public call's device work: g_idx's min and max, the kernel
                        work = jax.jit(lambda a, g: (jax_backend._minmax(g), pk.dequantize_gptq(a, j_gz, j_s, g, bits=bits,
                                                                                                zeros="v1")))
                        check(work(j_gw, jg)[1], ref)
                        t[f"jax gptq {bits}-bit{what} pallas + g_idx min/max (its device work, jit)"] = jax_ms(
                            lambda a: work(a, jg), j_gw)
                except Exception as e:  # noqa: BLE001  reported, not fatal
                    print(f"  pallas gptq {bits}-bit{what}: {type(e).__name__}: {str(e)[:300]}")
                if bits == 4 and g_idx is None:
                    jcore = jax.jit(lambda a, b, c: gptq.dequantize_gptq(jnp, a, b, c, None, bits=4, zeros="v1"))
                    check(jcore(j_gw, j_gz, j_s), ref)
                    t["jax gptq 4-bit core (jit)"] = jax_ms(lambda a: jcore(a, j_gz, j_s), j_gw)
        mb = want.nbytes / 1e6
        floor = "copy of the float16 output (torch d2d), back to back"
        print(f"{label}: float16 output {mb:.1f} MB, on {torch.cuda.get_device_name()}")
        for impl, ms in t.items():
            rows.append({"layer": label, "K": k, "N": n, "MB": round(mb, 1), "impl": impl, "median_ms": round(ms, 4),
                         "x_copy": round(ms / t[floor], 2), "GB_s": round(2 * mb / ms, 2)})
            print(f"  {impl:58s} {ms:9.4f} ms  {ms / t[floor]:6.2f}x the copy")
    return rows


#: the gpu-dequant rows the plot shows (the CSV and the text keep every row)
DEQUANT_PLOTTED = ("copy of the float16 output (torch d2d), back to back", "copy of the float16 output (torch d2d), CUDA graph",
                   "torch cuda awq (triton), CUDA graph", "torch cuda gptq 4-bit (triton), CUDA graph",
                   "torch cuda awq (triton), back to back", "jax awq eager (public call)", "jax awq core (jit)",
                   "jax gptq 4-bit eager (public call)", "torch cuda gptq 3-bit (triton), back to back",
                   "torch cuda gptq 4-bit act-order (triton), back to back", "jax gptq 4-bit act-order eager (public call)",
                   "jax gptq 3-bit eager (public call)", "torch cuda gptq 4-bit act-order (triton), CUDA graph of its device work")


def plot(rows: list[dict], path: Path, title: str, xlabel: str = "packed weight (MB)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.6))
    # a colour for every row (the default cycle's 10 repeat beyond 10 rows), the copies (the floors) dashed
    colours = iter(plt.get_cmap("tab20").colors)
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((float(r["MB"]), float(r["GB_s"])) for r in rows if r["impl"] == impl)
        colour = "black" if impl.startswith("seed") else next(colours)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, color=colour,
                linestyle="--" if impl.startswith("copy") else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("throughput (GB/s, bytes read + written)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_mode(mode: str, rows: list[dict], out: Path, machine: str) -> None:
    if mode == "gpu-dequant":
        plot([r for r in rows if r["impl"] in DEQUANT_PLOTTED], out / f"{mode}.png",
             f"dequantization, float16 scales and output ({machine}; GB/s counts the float16 output twice, as its copy "
             "moves it)", "float16 output (MB)")
    else:
        plot(rows, out / f"{mode}.png", f"AWQ -> GPTQ weight conversion ({mode}: {machine})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu", "gpu", "gpu-dequant", "cpu-jax", "replot"],
                   help="cpu-jax: the JAX rows alone, as JSON (used by cpu); replot: the plots again from the CSVs in --out")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--layers", help="gpu-dequant: only the layers whose label contains this (e.g. 70B)")
    args = p.parse_args()
    if args.mode == "cpu-jax":
        print(json.dumps(cpu_jax(args.quick)))
        return
    if args.mode == "replot":
        for csv_path in sorted(args.out.glob("*.csv")):
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and "impl" in rows[0]:
                plot_mode(csv_path.stem, rows, args.out, rows[0]["machine"])
                print(f"wrote {args.out / (csv_path.stem + '.png')}")
        return
    rows = cpu(args.quick) if args.mode == "cpu" else gpu() if args.mode == "gpu" else gpu_dequant(args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"
    if args.mode.startswith("gpu"):
        import torch

        machine = torch.cuda.get_device_name()
    with open(args.out / f"{args.mode}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", *rows[0]])
        w.writeheader()
        w.writerows({"machine": machine, **r} for r in rows)
    print(f"wrote {args.out / (args.mode + '.csv')}")
    try:
        plot_mode(args.mode, rows, args.out, machine)
        print(f"wrote {args.out / (args.mode + '.png')}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'packq[bench]')")


if __name__ == "__main__":
    main()
