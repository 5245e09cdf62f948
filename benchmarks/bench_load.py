"""Load a synthetic Llama-7B-shaped AWQ checkpoint with packq.jax.load, each part of the time measured.

    python benchmarks/bench_load.py                       # 8 virtual CPU devices, 1 GB, columns split 8 ways
    python benchmarks/bench_load.py --platform gpu --size-gb 3.5   # the first GPU, 3.5 GB (Llama-7B's size)

Every figure is the wall time of a fresh process (Python's start and JAX's import included), the median
of ``--repeat`` runs (each repeat runs every row once, in turn, so that a change of the machine's load
falls on all rows alike), page cache warm, with the user and system CPU seconds of the process and the
load average after each repeat, and printed beside what it is compared with:

- ``cat SRC/* > /dev/null``: reading the files;
- JAX's own start: ``import jax; jax.devices()`` (on a GPU, its client and the device's context);
- JAX's start plus reading the files: the above, then every shard read into host memory;
- the same, then each shard's bytes put on the devices as one array (the floor of any loader);
- ``safetensors.flax.load_file`` of every shard (where safetensors is installed);
- JAX's start plus writing layout "dequantized"'s bytes once into fresh memory (mapped as the host path maps its
  blocks, on 2 threads): the floor of any loader that makes those arrays, since on this project's VM a fresh page
  costs far more than writing it (about 0.3 s a GB in 4 KiB pages);
- JAX's start plus putting layout "int4"'s 4-bit values on the devices from host buffers that are reused (2
  threads): PJRT's own cost for those arrays, which it packs two a byte into memory of its own;
- ``packq.jax.load`` in every layout, with JAX's persistent compilation cache off, then on (a first run
  filling a fresh cache directory, then the timed runs reading it). Each run also prints, from JAX's
  monitoring events, how many functions it compiled, their compile seconds and the cache hits;
- on CPU devices, the same layouts by the XLA path (``PACKQ_JAX_HOST=0``, what packq did before its host
  path), without and with the cache.

Each loaded checkpoint is checked in the same run: every layout's arrays equal packq's NumPy conversion
of the same tensors (a sample of modules, every tensor of them, bit for bit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import make  # noqa: E402

LAYOUTS = ("source", "gptq", "awq", "compressed-tensors", "int4", "dequantized")

CHILD = r"""
import os, sys, json, resource, time
t0 = time.perf_counter()
mode, src, platform = sys.argv[1], sys.argv[2], sys.argv[3]
if platform == "cpu":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax import monitoring
events = {"compiles": 0, "compile_s": 0.0, "cache_hits": 0}
def _dur(e, d, **kw):
    if e == "/jax/core/compile/backend_compile_duration":
        events["compiles"] += 1
        events["compile_s"] += d
def _ev(e, **kw):
    if e == "/jax/compilation_cache/cache_hits":
        events["cache_hits"] += 1
monitoring.register_event_duration_secs_listener(_dur)
monitoring.register_event_listener(_ev)
devices = jax.devices()
t_start = time.perf_counter()
files = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))
out = {}
if mode == "start":
    pass
elif mode in ("read", "read+put"):
    for name in files:
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        if mode == "read+put":
            out[name] = jax.device_put(np.frombuffer(data, np.uint8), devices[0])
elif mode == "fresh":  # the memory floor of a layout: its bytes written once to fresh memory, as the host path maps it
    import mmap, threading
    from concurrent.futures import ThreadPoolExecutor
    block, total = 8 << 20, int(os.environ["FRESH_BYTES"])
    def one(i):
        n = min(block, total - i)
        a = np.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
        a.fill(1)
        return a
    with ThreadPoolExecutor(2) as pool:
        kept = list(pool.map(one, range(0, total, block)))
elif mode == "put4":  # PJRT's own cost for int4's arrays: its 4-bit values put, from host buffers reused, 2 threads
    from concurrent.futures import ThreadPoolExecutor
    import jax.numpy as jnp
    block, total = 1 << 22, int(os.environ["PUT4_VALUES"])
    host = [(np.arange(block) % 16).astype(np.uint8).view(jnp.uint4) for _ in range(2)]
    def one(i):
        n = min(block, total - i)
        return jax.device_put(host[(i // block) % 2][:n], devices[(i // block) % len(devices)])
    with ThreadPoolExecutor(1) as even, ThreadPoolExecutor(1) as odd:  # each host buffer used by one thread only
        futures = [(odd if (i // block) % 2 else even).submit(one, i) for i in range(0, total, block)]
        out = {str(k): f.result() for k, f in enumerate(futures)}
elif mode == "flax":
    from safetensors.flax import load_file
    for name in files:
        out.update(load_file(os.path.join(src, name)))
else:
    import packq.jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    kw = {}
    if platform == "cpu":  # each quantized module's columns over the 8 devices
        mesh = Mesh(np.array(devices), ("d",))
        spec = P("d", None) if mode == "compressed-tensors" else P(None, "d")
        kw["shardings"] = {r".*_proj\.(qweight|weight_packed|weight)": NamedSharding(mesh, spec)}
    out = packq.jax.load(src, layout=mode, **kw)
jax.block_until_ready(out)
t_end = time.perf_counter()
check_s = 0.0
if mode in ("source", "gptq", "awq", "compressed-tensors", "int4", "dequantized") and os.environ.get("CHECK") == "1":
    import packq
    from packq.checkpoint.folder import open_checkpoint
    ckpt = open_checkpoint(src)
    sample = [m for i, m in enumerate(ckpt.modules.values()) if i % 37 == 0]
    def stored(name):
        shard = next(s for s in ckpt.shards.values() if name in s.tensors)
        with shard.open() as f:
            return f.array(name)
    for m in sample:
        w, z, s = (stored(m.names[p]) for p in ("qweight", "qzeros", "scales"))
        gw, gz = packq.fast_awq_to_gptq(w, z)
        v2 = packq.zeros_v1_to_v2(gz)
        want = {"source": {"qweight": w, "qzeros": z, "scales": s}, "awq": {"qweight": w, "qzeros": z, "scales": s},
                "gptq": {"qweight": gw, "qzeros": v2, "scales": s,
                         "g_idx": (np.arange(m.k) // (m.k // m.groups)).astype(np.int32)},
                "compressed-tensors": dict(zip(("weight_packed", "weight_zero_point", "weight_scale"),
                                               packq.gptq_to_compressed_tensors(gw, v2, s))),
                "int4": {"weight": packq.unpack(gw, "row", dtype=np.uint8), "zeros": packq.unpack(v2, dtype=np.uint8),
                         "scales": s},
                "dequantized": {"weight": packq.dequantize_awq(w, z, s)}}[mode]
        for part, x in want.items():
            got = np.asarray(out[f"{m.prefix}.{part}"])
            if str(got.dtype) == "uint4":
                got = got.astype(np.uint8)
            assert got.shape == x.shape and got.tobytes() == x.tobytes(), (mode, m.prefix, part)
    events["checked_modules"] = len(sample)
    check_s = time.perf_counter() - t_end
nbytes = sum(s.data.nbytes for a in out.values() for s in a.addressable_shards) if out else 0
print(json.dumps({"import_s": t_start - t0, "work_s": t_end - t_start, "check_s": check_s, "array_bytes": nbytes, **events,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(mode: str, src: Path, platform: str, env: dict[str, str]) -> tuple[float, dict]:
    """One fresh process: its wall time (less the check after the load) and what it printed, with the user and
    system CPU seconds it used (the machine is shared: CPU seconds say more than wall time under load)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), platform], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["user_s"], info["sys_s"] = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return wall - info["check_s"], info  # the check after the load is not the load's time


def _dequantized_bytes(src: Path) -> int:
    """The bytes of layout "dequantized"'s arrays: each quantized module's (K, N) weight in its scales' dtype, every
    other tensor as stored."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from packq.checkpoint.folder import open_checkpoint

    ckpt = open_checkpoint(src)
    quantized = {name for m in ckpt.modules.values() for name in m.names.values()}
    other = sum(i.nbytes for sh in ckpt.shards.values() for name, i in sh.tensors.items() if name not in quantized)
    weights = sum(math.prod(m.lead) * m.k * m.n * m.infos["scales"].nbytes // max(1, math.prod(m.infos["scales"].shape))
                  for m in ckpt.modules.values())
    return other + weights


def _int4_values(src: Path) -> int:
    """The 4-bit values of layout "int4"'s arrays: each quantized module's (K, N) weight and (groups, N) zeros."""
    from packq.checkpoint.folder import open_checkpoint

    ckpt = open_checkpoint(src)
    return sum(math.prod(m.lead) * (m.k + m.groups) * m.n for m in ckpt.modules.values())


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--cached", default=None, help="the layouts also run with JAX's compilation cache (default: --layouts)")
    p.add_argument("--no-xla", action="store_true", help="on CPU, leave out the XLA path's rows (PACKQ_JAX_HOST=0)")
    args = p.parse_args()
    layouts = args.layouts.split(",")
    cached_layouts = layouts if args.cached is None else [x for x in args.cached.split(",") if x]
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE") and k != "PACKQ_JAX_HOST"}
    base["JAX_PLATFORMS"] = "cpu" if args.platform == "cpu" else "cuda"
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = Path(tmp) / "src"
        largest_shard, largest_tensor = make(src, args.size_gb)
        total = sum(f.stat().st_size for f in src.iterdir())
        where = "8 virtual CPU devices, columns split 8 ways" if args.platform == "cpu" else "one GPU"
        print(f"synthetic AWQ checkpoint: {total / 1e9:.2f} GB, largest shard {largest_shard / 1e6:.0f} MB, "
              f"largest tensor {largest_tensor / 1e6:.1f} MB; {where}; median of {args.repeat} fresh processes, "
              "every row once in each repeat, in turn", flush=True)
        cache = Path(tmp) / "jax-cache"
        cached = {**base, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        xla = {**base, "PACKQ_JAX_HOST": "0"}
        xla_cached = {**cached, "PACKQ_JAX_HOST": "0"}
        fresh, values4 = _dequantized_bytes(src), _int4_values(src)
        runs = [("start", base), ("read", base), ("read+put", base), ("flax", base), ("fresh", {**base, "FRESH_BYTES": str(fresh)}),
                ("put4", {**base, "PUT4_VALUES": str(values4)})]
        runs += [(layout, base) for layout in layouts] + [(f"{layout} (cached)", cached) for layout in cached_layouts]
        if args.platform == "cpu" and not args.no_xla:  # the XLA path, as before the host path, for comparison
            converting = [layout for layout in layouts if layout not in ("source", "awq")]
            runs += [(f"{layout} (XLA)", xla) for layout in converting]
            runs += [(f"{layout} (XLA, cached)", xla_cached) for layout in converting]
        for name, env in runs:  # fill the caches (first runs, not timed)
            if "cached" in name:
                child(name.split(" ")[0], src, args.platform, env)
        got: dict[str, list[dict]] = {}
        loads = []
        for rep in range(args.repeat):
            t = time.perf_counter()
            subprocess.run(["sh", "-c", f"cat '{src}'/* > /dev/null"], check=True)
            got.setdefault("cat", []).append({"wall": time.perf_counter() - t})
            for name, env in runs:
                try:  # the first run of each layout also checks its arrays against NumPy, after the timed load
                    wall, i = child(name.split(" ")[0], src, args.platform, {**env, "CHECK": "1"} if rep == 0 else env)
                    if i.get("checked_modules"):
                        print(f"  checked {name}: {i['checked_modules']} modules bit for bit against NumPy", flush=True)
                except AssertionError:
                    if name == "flax":  # safetensors missing, or its flax module
                        continue
                    raise
                got.setdefault(name, []).append({**i, "wall": wall})
                print(f"    run {rep + 1}: {name} {wall:.2f} s (user {i['user_s']:.2f}, sys {i['sys_s']:.2f}), "
                      f"load {i['work_s']:.2f} s, {i['compiles']} compiles", flush=True)
            loads.append(os.getloadavg()[0])
            print(f"  repeat {rep + 1}: load average {loads[-1]:.2f}", flush=True)
        med = {k: _median(v, "wall") for k, v in got.items()}
        # CPU seconds from the runs that did not check their arrays after loading (the first one of each row did)
        timed = {k: v[1:] if len(v) > 1 else v for k, v in got.items()}
        cpu = {k: _median(v, "user_s") + _median(v, "sys_s") for k, v in timed.items() if k != "cat"}
        print(f"load average over the repeats: {min(loads):.2f}-{max(loads):.2f} (1-minute, after each repeat)")
        print("medians: wall time of a fresh process (spread: its fastest and slowest run); CPU = user + system seconds of "
              "it, from the runs that did not check their arrays; ratios of wall times, and of CPU seconds")

        def row(label: str, name: str, vs: str | None = None) -> str:
            r = got[name]
            spread = f"{min(x['wall'] for x in r):.2f}-{max(x['wall'] for x in r):.2f}"
            line = (f"{label:44s} {med[name]:6.2f} s ({spread})  CPU {cpu[name]:6.2f} s "
                    f"(user {_median(timed[name], 'user_s'):.2f}, sys {_median(timed[name], 'sys_s'):.2f})")
            if vs:
                line += f"  = {med[name] / med[vs]:.2f}x {'baseline' if vs == 'read' else vs} (CPU {cpu[name] / cpu[vs]:.2f}x)"
            return line

        print(f"cat SRC/* > /dev/null                        {med['cat']:6.2f} s")
        print(row("JAX's start (import jax; jax.devices())", "start"))
        print(row("JAX's start + reading the files", "read") + "   (the baseline)")
        print(row("  + the bytes put on the device", "read+put", "read"))
        if "flax" in got:
            print(row("safetensors.flax.load_file, every shard", "flax", "read"))
        print(row(f"  + writing dequantized's {fresh / 1e9:.2f} GB to fresh memory", "fresh", "read") + "   (its writes alone)")
        print(row(f"  + putting int4's {values4 / 1e9:.2f} G 4-bit values", "put4", "read") + "   (PJRT's packing alone)")
        for name, _ in runs[6:]:
            i = got[name][0] if len(got[name]) == 1 else got[name][1]  # a timed run's events, not the checking one's
            vs = "source" if "cached" not in name else "source (cached)"
            print(row(f"packq.jax.load {name}", name, "read") + (f", {med[name] / med[vs]:.2f}x {vs}"
                                                                 f" (CPU {cpu[name] / cpu[vs]:.2f}x)" if name != vs else ""))
            print(f"{'':44s} import {_median(got[name], 'import_s'):.2f} s, load {_median(got[name], 'work_s'):.2f} s, "
                  f"{i['compiles']} compiles ({i['compile_s']:.2f} s), {i['cache_hits']} cache hits, "
                  f"peak RSS {_median(got[name], 'peak_rss') / 1e6:.0f} MB")
        with_cache = (f", {max(med[f'{x} (cached)'] / med['source (cached)'] for x in cached_layouts):.2f}x with the cache"
                      if "source" in cached_layouts else "")
        print(f"targets: source {med['source'] / med['read']:.2f}x JAX's start + reading (target 1.5x); every layout "
              f"within {max(med[layout] / med['source'] for layout in layouts):.2f}x source (target 1.25x){with_cache}")


if __name__ == "__main__":
    main()
