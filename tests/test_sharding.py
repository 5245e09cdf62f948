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
