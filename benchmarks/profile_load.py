"""Where ``packq.jax.load``'s time goes, layout by layout, in fresh processes (a profile, not a benchmark).

    python benchmarks/profile_load.py --platform gpu --size-gb 3.5 [--layouts source,gptq] [--variants plain,sync]

Each child process times, with wrappers around the loader's own functions: JAX's import and start, opening and
checking the checkpoint, reading the bytes (``_read_block``), making the device arrays
(``make_array_from_callback``), the conversions' dispatch (``_convert_module``, the wait for a compile ahead
included and shown apart), each compile ahead (tracing + lowering, XLA's compile) on its thread, and the final
``block_until_ready``. Variant "sync" waits for each module's conversion (the device time of conversions, one
module at a time); "cached" runs with JAX's persistent compilation cache,
filled first. Prints one line per run and a JSON object per run to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import make  # noqa: E402

CHILD = r"""
import os, sys, json, time, threading, collections
marks = {}
t0 = time.perf_counter()
layout, src, platform, variant = sys.argv[1:5]
import jax, numpy as np
from jax import monitoring
events = {}
def _dur(e, d, **kw):
    if e == "/jax/core/compile/backend_compile_duration":
        events["xla_compiles"] = events.get("xla_compiles", 0) + 1
        events["xla_compile_s"] = events.get("xla_compile_s", 0.0) + d
def _ev(e, **kw):
    if e == "/jax/compilation_cache/cache_hits":
        events["cache_hits"] = events.get("cache_hits", 0) + 1
monitoring.register_event_duration_secs_listener(_dur)
monitoring.register_event_listener(_ev)
devices = jax.devices()
t_jax = time.perf_counter()
import packq.jax
from packq.checkpoint import jax_loader as jl
acc = collections.defaultdict(float)
count = collections.Counter()
lock = threading.Lock()
def timed(name, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            with lock:
                acc[name] += time.perf_counter() - t
                count[name] += 1
    return wrapper
jl._Loader._read_block = timed("read_block", jl._Loader._read_block)
jl.open_checkpoint = timed("open_checkpoint", jl.open_checkpoint)
jl._Loader.check = timed("check", jl._Loader.check)
real_mafc = jax.make_array_from_callback
jl.jax = type("J", (), {k: getattr(jax, k) for k in dir(jax) if not k.startswith("__")})
jl.jax.make_array_from_callback = timed("make_array_from_callback", real_mafc)
real_conv = jl._convert_module
def conv(st, a, s, job=None):
    if job is not None:
        t = time.perf_counter()
        try:
            job.result()
        except Exception:
            pass
        acc["wait_for_compile"] += time.perf_counter() - t
    marks.setdefault("first_convert_at", time.perf_counter() - t_load)
    out = real_conv(st, a, s, job)
    marks["last_convert_at"] = time.perf_counter() - t_load
    if variant == "sync":
        t = time.perf_counter(); jax.block_until_ready(out); acc["sync_each_module"] += time.perf_counter() - t
    return out
jl._convert_module = timed("convert_module (dispatch)", conv)
real_exe = jl._executable
def exe(st, sig, s):
    t = time.perf_counter()
    fn, _ = jl._compiled(st, sig, s)
    t1 = time.perf_counter()
    r = real_exe(st, sig, s)
    with lock:
        acc["ahead: trace (make_jaxpr)"] += t1 - t
        acc["ahead: lower+compile"] += time.perf_counter() - t1
        count["ahead"] += 1
        marks["last_compile_done_at"] = time.perf_counter() - t_load
    return r
jl._executable = exe
real_put = jax.device_put
jl.jax.device_put = timed("device_put (constants)", real_put)
t_load = time.perf_counter()
marks.clear()
out = packq.jax.load(src, layout=layout)
t_ret = time.perf_counter()
jax.block_until_ready(out)
t_end = time.perf_counter()
res = {"layout": layout, "variant": variant, "import_and_start_s": t_jax - t0, "packq_import_s": t_load - t_jax,
       "load_returns_s": t_ret - t_load, "block_until_ready_s": t_end - t_ret, "total_s": t_end - t0,
       "modules": len(out), **{k: round(v, 4) for k, v in acc.items()}, **{k: round(v, 3) for k, v in marks.items()},
       **events, "counts": dict(count)}
print(json.dumps(res))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--layouts", default="source,gptq,compressed-tensors,int4,dequantized")
    p.add_argument("--variants", default="plain")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PLATFORMS"] = "cpu" if args.platform == "cpu" else "cuda"
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = Path(tmp) / "src"
        make(src, args.size_gb)
        subprocess.run(["sh", "-c", f"cat '{src}'/* > /dev/null"], check=True)
        for _ in range(args.repeat):
            for variant in args.variants.split(","):
                run_env = env
                if variant == "cached":  # JAX's persistent cache, filled by a first untimed run of each layout
                    run_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax-cache"),
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
                    for layout in args.layouts.split(","):
                        subprocess.run([sys.executable, "-c", CHILD, layout, str(src), args.platform, variant],
                                       capture_output=True, text=True, env=run_env)
                for layout in args.layouts.split(","):
                    r = subprocess.run([sys.executable, "-c", CHILD, layout, str(src), args.platform, variant],
                                       capture_output=True, text=True, env=run_env)
                    if r.returncode:
                        print(f"{layout} {variant}: failed\n{r.stderr[-2000:]}", flush=True)
                        continue
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    show = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "counts"}
                    print(json.dumps(show), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
