"""Run the multi-device suite in its own process: JAX must start with 8 virtual CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_sharded_conversions_on_8_virtual_devices():
    here = Path(__file__).parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        str(here / "multidevice")], env=env, capture_output=True, text=True, cwd=here.parent)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_two_processes_each_read_their_own_share(tmp_path):
    """packq.jax.load under jax.distributed on localhost: 2 processes x 4 CPU devices, every quantized
    module's columns split over all 8. Each process checks its addressable shards against the checkpoint's
    own conversion, and reads exactly half of the modules' bytes plus the replicated tensors, once."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).parent / "multiprocess" / "load_worker.py"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["devices"] == 8 and r["local"] == 4 and r["shards_checked"] > 0
        assert r["bytes_read"] == r["other_bytes"] + r["module_bytes"] // 2, r
