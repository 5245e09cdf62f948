"""Convert a synthetic ~1 GB AWQ checkpoint with `packq convert`; compare with `cp -r` and the largest shard.

    python benchmarks/bench_convert.py [--size-gb 1.0] [--backend numpy] [--targets gptq,compressed-tensors,float16]

Prints, from one run: each conversion's wall time against the floor of writing its bytes, timed
interleaved with it (repetition by repetition, page cache warm for both; medians): for the packed
targets `cp -r SRC DST && sync` of the source folder, for the float targets `cp -r` of that
repetition's own output and `sync` (packq fsyncs what it writes, so the copy is made durable too);
the conversion process's peak resident memory against the largest shard and the largest tensor; and
the machine's load (`uptime`) before and after, since the machines are shared. Bit-exactness in the
same run: each target is converted once more with `--verify` (every module dequantized from source
and result by the plain core and compared bit for bit), and every timed output's files are compared
with that verified one's (SHA-256) before it is deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import py_compile
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from packq.checkpoint.safetensors import SafetensorsWriter  # noqa: E402

HIDDEN, INTER, VOCAB, GROUP = 4096, 11008, 8000, 128


def make(root: Path, size_gb: float) -> tuple[int, int]:
    """A Llama-7B-shaped AWQ checkpoint of random words, one shard per two layers; (largest shard, largest tensor)."""
    rng = np.random.default_rng(0)
    mods = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
            "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
            "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER), "mlp.down_proj": (INTER, HIDDEN)}
    per_layer = sum(k * n // 2 + (k // GROUP) * (n // 2 + 2 * n) for k, n in mods.values()) + 4 * HIDDEN
    layers = max(2, int(size_gb * 1e9 / per_layer) // 2 * 2)
    root.mkdir(parents=True)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]]
    for layer in range(layers):
        if layer % 2 == 0 and layer:
            shards.append([])
        p = f"model.layers.{layer}"
        for m, (k, n) in mods.items():
            shards[-1] += [(f"{p}.{m}.qweight", "I32", (k, n // 8)), (f"{p}.{m}.qzeros", "I32", (k // GROUP, n // 8)),
                           (f"{p}.{m}.scales", "F16", (k // GROUP, n))]
        shards[-1] += [(f"{p}.input_layernorm.weight", "BF16", (HIDDEN,)),
                       (f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,))]
    shards[-1] += [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    weight_map, largest_shard, largest_tensor = {}, 0, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        size = {"I32": 4, "F16": 2, "BF16": 2}
        entries = [(n, d, s, size[d] * int(np.prod(s))) for n, d, s in tensors]
        w = SafetensorsWriter(root / fname, entries, {"format": "pt"})
        for name, dtype, shape, nbytes in entries:
            w.write(name, rng.integers(0, 256, nbytes, dtype=np.uint8) if dtype != "F16"
                    else (rng.random(shape) * 0.01).astype(np.float16))
            weight_map[name] = fname
            largest_tensor = max(largest_tensor, nbytes)
        w.close()
        largest_shard = max(largest_shard, (root / fname).stat().st_size)
    total = sum((root / f).stat().st_size for f in set(weight_map.values()))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}}))
    return largest_shard, largest_tensor


CHILD = """
import resource, sys
from packq.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


#: what each target passes to packq convert (v1 per field: the example's routes all read it alike)
TARGETS = {"gptq": ["--for", "tgi"], "compressed-tensors": ["--to", "compressed-tensors"],
           "float16": ["--to", "float16"], "bfloat16": ["--to", "bfloat16"], "float32": ["--to", "float32"]}
FLOATS = ("float16", "bfloat16", "float32")


#: CPU seconds (user, system) of each timed command, children included: less noisy than wall time on a shared machine
CPU: dict[str, list[tuple[float, float]]] = {}


def _timed(cmd: list[str], env: dict[str, str] | None = None, row: str = "") -> tuple[float, subprocess.CompletedProcess[str]]:
    r0, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    t, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if row:
        CPU.setdefault(row, []).append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
    return t, r


def _cpu(row: str) -> str:
    """The median user and system CPU seconds of a row's runs."""
    user, system = (statistics.median(x[i] for x in CPU[row]) for i in (0, 1))
    return f"CPU user {user:.2f} s + sys {system:.2f} s = {user + system:.2f} s"


def _digest(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 (so that a verified output need not stay on disk beside the timed ones)."""
    out = {}
    for f in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--targets", default="gptq,compressed-tensors", help=f"comma-separated, of {', '.join(TARGETS)}")
    args = p.parse_args()
    targets = args.targets.split(",")
    print(f"{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{_load()} before")
    # packq's bytecode, as pip writes it when installing: where PYTHONDONTWRITEBYTECODE is set (this project's
    # machines), every child would otherwise compile packq from source (0.05-0.1 s of each start)
    for f in (Path(__file__).resolve().parent.parent / "packq").rglob("*.py"):
        py_compile.compile(str(f), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = Path(tmp) / "src"
        largest_shard, largest_tensor = make(src, args.size_gb)
        total = sum(f.stat().st_size for f in src.iterdir())
        child = [sys.executable, "-c", CHILD, "convert", str(src)]
        verified: dict[str, dict[str, str]] = {}
        for target in targets:  # bit-exactness first: one verified conversion per target, untimed
            out = Path(tmp) / f"verified-{target}"
            r = subprocess.run([*child, str(out), "--backend", args.backend, "--verify", *TARGETS[target]],
                               capture_output=True, text=True)
            assert r.returncode == 0 and "verified" in r.stdout, r.stdout + r.stderr
            verified[target] = _digest(out)
            shutil.rmtree(out)
        cp_t: list[float] = []
        own_t: dict[str, list[float]] = {t: [] for t in targets if t in FLOATS}
        conv_t: dict[str, list[float]] = {t: [] for t in targets}
        peaks: dict[str, list[int]] = {t: [] for t in targets}
        for i in range(args.repeat):  # interleaved, so that drifts of a shared machine hit every row alike
            t, _ = _timed(["sh", "-c", f"cp -r '{src}' '{tmp}/copy{i}' && sync"], row="cp")
            cp_t.append(t)
            shutil.rmtree(f"{tmp}/copy{i}")
            for target in targets:
                out = Path(tmp) / f"out{i}"
                t, r = _timed([*child, str(out), "--backend", args.backend, *TARGETS[target]], row=target)
                assert r.returncode == 0, r.stderr
                conv_t[target].append(t)
                peaks[target].append(int(r.stderr.split("PEAK_RSS_KB")[1].split()[0]) * 1024)
                if target in FLOATS:  # the floor of writing these bytes: a copy of this very output, made durable
                    t, _ = _timed(["sh", "-c", f"cp -r '{out}' '{tmp}/copy{i}' && sync"], row=f"own {target}")
                    own_t[target].append(t)
                    shutil.rmtree(f"{tmp}/copy{i}")
                assert _digest(out) == verified[target], f"{target}: run {i} differs from the verified conversion"
                shutil.rmtree(out)
        cp_m = statistics.median(cp_t)
        print(f"synthetic AWQ checkpoint: {total / 1e9:.2f} GB, largest shard {largest_shard / 1e6:.0f} MB, "
              f"largest tensor {largest_tensor / 1e6:.1f} MB; {args.repeat} repetitions, interleaved; {_load()} after")
        print(f"cp -r SRC && sync:  {cp_m:6.2f} s  (median; {', '.join(f'{x:.2f}' for x in cp_t)}); {_cpu('cp')}")
        for target in targets:
            m, peak = statistics.median(conv_t[target]), max(peaks[target])
            runs = ", ".join(f"{x:.2f}" for x in conv_t[target])
            if target in FLOATS:
                own = statistics.median(own_t[target])
                ratios = sorted(c / o for c, o in zip(conv_t[target], own_t[target]))
                print(f"packq convert to {target}: {m:6.2f} s ({runs}) = {m / own:.2f}x cp -r of its own output && sync "
                      f"({own:.2f} s; per repetition {', '.join(f'{x:.2f}' for x in ratios)}x)")
                print(f"    {_cpu(target)}; the copy of its output: {_cpu(f'own {target}')}")
            else:
                ratios = sorted(c / o for c, o in zip(conv_t[target], cp_t))
                print(f"packq convert to {target}: {m:6.2f} s ({runs}) = {m / cp_m:.2f}x cp -r SRC && sync "
                      f"(per repetition {', '.join(f'{x:.2f}' for x in ratios)}x)")
                print(f"    {_cpu(target)} (cp -r && sync: {_cpu('cp').removeprefix('CPU ')})")
            print(f"    peak RSS {peak / 1e6:6.0f} MB = {peak / largest_shard:.2f}x the largest shard, "
                  f"{peak / largest_tensor:.1f}x the largest tensor; every output equal to a --verify'd conversion "
                  f"({args.backend} backend, process start and imports included)")


if __name__ == "__main__":
    main()
