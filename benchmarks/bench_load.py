"""Load the synthetic ~1 GB AWQ checkpoint onto 8 virtual CPU devices with packq.jax.load.

    python benchmarks/bench_load.py [--size-gb 1.0]

Compares, in one run (median of 3, page cache warm), reading the files once (`cat SRC/* > /dev/null`)
with packq.jax.load in a fresh process for: layout "source" (as stored) and "gptq" (converted on the
devices), each quantized module's columns sharded over the 8 devices. Prints the wall time (process
start and JAX's import included), the bytes read, and host memory: the process's peak resident set
against the bytes the 8 devices hold (on CPU devices they live in host memory, a replicated tensor
once per device), whose difference is what loading costs on top of the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import make  # noqa: E402

CHILD = """
import os, sys, json, resource, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import packq.jax
mesh = Mesh(np.array(jax.devices()), ("d",))
stats = {}
out = packq.jax.load(sys.argv[1], layout=sys.argv[2], stats=stats,
                     shardings={r".*_proj\\.qweight": NamedSharding(mesh, P(None, "d"))})
jax.block_until_ready(out)
nbytes = sum(s.data.nbytes for a in out.values() for s in a.addressable_shards)  # replicas counted
print(json.dumps({"bytes_read": stats["bytes_read"], "array_bytes": nbytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = Path(tmp) / "src"
        largest_shard, largest_tensor = make(src, args.size_gb)
        total = sum(f.stat().st_size for f in src.iterdir())
        times: dict[str, list[float]] = {"cat": [], "source": [], "gptq": []}
        info: dict[str, dict] = {}
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run(["sh", "-c", f"cat '{src}'/* > /dev/null"], check=True)
            times["cat"].append(time.perf_counter() - t)
            for layout in ("source", "gptq"):
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", CHILD, str(src), layout], capture_output=True, text=True)
                times[layout].append(time.perf_counter() - t)
                assert r.returncode == 0, r.stderr[-3000:]
                info[layout] = json.loads(r.stdout.strip().splitlines()[-1])
        cat = statistics.median(times["cat"])
        print(f"synthetic AWQ checkpoint: {total / 1e9:.2f} GB, largest shard {largest_shard / 1e6:.0f} MB, "
              f"largest tensor {largest_tensor / 1e6:.1f} MB; 8 virtual CPU devices")
        print(f"cat SRC/* > /dev/null: {cat:6.2f} s  (median of {args.repeat})")
        for layout in ("source", "gptq"):
            m, i = statistics.median(times[layout]), info[layout]
            extra = i["peak_rss"] - i["array_bytes"]
            print(f"packq.jax.load layout={layout:6s}: {m:6.2f} s = {m / cat:.1f}x cat; read {i['bytes_read'] / 1e9:.2f} GB; "
                  f"peak RSS {i['peak_rss'] / 1e6:.0f} MB = arrays {i['array_bytes'] / 1e6:.0f} MB + {extra / 1e6:.0f} MB "
                  f"({extra / largest_tensor:.1f}x the largest tensor)")


if __name__ == "__main__":
    main()
