"""One of two JAX processes (4 virtual CPU devices each) loading the example with packq.jax.load.

    python load_worker.py PROCESS_ID PORT OUT_DIR

Joins JAX's distributed runtime on localhost, loads the example as GPTQ with every module's columns
split over all 8 devices, checks each of its addressable shards against the checkpoint's own
conversion, and prints one JSON line: the bytes it read and what it checked. Run by test_sharding.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-awq"


def main() -> None:
    process, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process)
    import packq.jax
    from packq.checkpoint import convert_checkpoint
    from packq.checkpoint.folder import open_checkpoint

    mesh = Mesh(np.array(jax.devices()), ("d",))
    stats: dict = {}
    got = packq.jax.load(EXAMPLE, layout="gptq", stats=stats,
                         shardings={r".*_proj\.qweight": NamedSharding(mesh, P(None, "d"))})
    want_dir = out / f"want{process}"
    convert_checkpoint(EXAMPLE, want_dir, checkpoint_format="gptq_v2")
    ckpt, want = open_checkpoint(want_dir), {}
    for shard in ckpt.shards.values():
        with shard.open() as f:
            for name, info in shard.tensors.items():
                want[name] = f.array_bits(name) if info.dtype == "BF16" else f.array(name)
    checked = 0
    for name, arr in got.items():
        for s in arr.addressable_shards:
            data = np.asarray(s.data)
            data = data.view(np.uint16) if data.dtype.name == "bfloat16" else data
            assert np.array_equal(data, want[name][s.index]), (name, s.index)
            checked += 1
    sizes = {n: i.nbytes for sh in open_checkpoint(EXAMPLE).shards.values() for n, i in sh.tensors.items()}
    module = sum(v for n, v in sizes.items() if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales"))
    print(json.dumps({"process": process, "devices": len(jax.devices()), "local": len(jax.local_devices()),
                      "bytes_read": stats["bytes_read"], "module_bytes": module,
                      "other_bytes": sum(sizes.values()) - module, "shards_checked": checked}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
