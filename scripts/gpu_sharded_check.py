"""On a machine with several GPUs: a sharded 8192 x 28672 AWQ -> GPTQ conversion against one device.

Checks that the sharded result equals the one-device result bit for bit, keeps the input's sharding,
and compiles with no collective; times both (back-to-back launches, one wait; median of 5 batches).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
from _words import raw_words  # noqa: E402
from bench import jax_ms as time_ms  # noqa: E402

import packq  # noqa: E402
from packq.backends import for_arrays  # noqa: E402
from packq.formats import awq  # noqa: E402

COLLECTIVES = re.compile(r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter")


def main() -> int:
    gpus = jax.devices("gpu")
    print(f"devices: {[d.device_kind for d in gpus]}")
    if len(gpus) < 2:
        print("needs 2 GPUs")
        return 1
    k, n = 8192, 28672
    qw = raw_words(11, (k, n // 8))
    one = jax.device_put(jnp.asarray(qw), gpus[0])
    weight = lambda a: for_arrays(x=a).run(awq.weight_to_gptq, a)  # noqa: E731
    ref = np.asarray(weight(one))
    ok = np.array_equal(ref, packq.fast_awq_to_gptq(qw, np.zeros((1, n // 8), np.int32))[0])
    t_one = time_ms(weight, one)
    mesh = Mesh(np.array(gpus[:2]), ("x",))
    rows = []
    for label, spec in (("columns (N)", P(None, "x")), ("rows (K)", P("x", None))):
        xs = jax.device_put(jnp.asarray(qw), NamedSharding(mesh, spec))
        out = weight(xs)
        same = np.array_equal(np.asarray(out), ref)
        kept = out.sharding == NamedSharding(mesh, spec)
        hlo = for_arrays(x=xs).compiled(awq.weight_to_gptq, xs).lower(xs).compile().as_text()
        coll = sorted(set(COLLECTIVES.findall(hlo)))
        t = time_ms(weight, xs)
        ok &= same and kept and not coll
        rows.append((label, t, same, kept, coll))
    mb = qw.nbytes / 1e6
    print(f"8192 x 28672 AWQ qweight ({mb:.1f} MB): one GPU {t_one:.3f} ms ({2 * mb / t_one:.0f} GB/s)")
    for label, t, same, kept, coll in rows:
        print(f"  sharded over 2 GPUs by {label}: {t:.3f} ms ({2 * mb / t:.0f} GB/s), {t_one / t:.2f}x the one-GPU "
              f"speed; equal to one GPU: {same}; sharding kept: {kept}; collectives: {coll or 'none'}")
    print("ALL PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
