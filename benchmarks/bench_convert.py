"""Convert a synthetic ~1 GB AWQ checkpoint with `packq convert`; compare with `cp -r` and the largest shard.

    python benchmarks/bench_convert.py [--size-gb 1.0] [--backend numpy] [--targets gptq,compressed-tensors]

Prints, from one run: the conversion's wall time against `cp -r SRC DST && sync` of the same folder
(packq fsyncs what it writes; median of 3 each, interleaved, page cache warm for both), and the
conversion process's peak resident memory against the
largest shard and the largest tensor.
"""

from __future__ import annotations

import argparse
import json
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
           "float16": ["--to", "float16"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--targets", default="gptq,compressed-tensors", help=f"comma-separated, of {', '.join(TARGETS)}")
    args = p.parse_args()
    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = Path(tmp) / "src"
        largest_shard, largest_tensor = make(src, args.size_gb)
        total = sum(f.stat().st_size for f in src.iterdir())
        cp_t: list[float] = []
        conv_t: dict[str, list[float]] = {t: [] for t in targets}
        peaks: dict[str, list[int]] = {t: [] for t in targets}
        for i in range(args.repeat):  # interleaved, so that drifts of a shared machine hit every row alike
            t = time.perf_counter()
            # packq fsyncs every file it writes, so the copy is made durable too
            subprocess.run(["sh", "-c", f"cp -r '{src}' '{tmp}/copy{i}' && sync"], check=True)
            cp_t.append(time.perf_counter() - t)
            shutil.rmtree(f"{tmp}/copy{i}")
            for target in targets:
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", CHILD, "convert", str(src), f"{tmp}/out{i}",
                                    "--backend", args.backend, *TARGETS[target]], capture_output=True, text=True)
                conv_t[target].append(time.perf_counter() - t)
                assert r.returncode == 0, r.stderr
                peaks[target].append(int(r.stderr.split("PEAK_RSS_KB")[1].split()[0]) * 1024)
                shutil.rmtree(f"{tmp}/out{i}")
        cp_m = statistics.median(cp_t)
        print(f"synthetic AWQ checkpoint: {total / 1e9:.2f} GB, largest shard {largest_shard / 1e6:.0f} MB, "
              f"largest tensor {largest_tensor / 1e6:.1f} MB")
        print(f"cp -r && sync:  {cp_m:6.2f} s  (median of {args.repeat})")
        first = statistics.median(conv_t[targets[0]])
        for target in targets:
            m, peak = statistics.median(conv_t[target]), max(peaks[target])
            print(f"packq convert to {target}: {m:6.2f} s  = {m / cp_m:.2f}x cp -r && sync, {m / first:.2f}x to {targets[0]}  "
                  f"({args.backend} backend, process start and imports included)")
            print(f"    peak RSS {peak / 1e6:6.0f} MB = {peak / largest_shard:.2f}x the largest shard, "
                  f"{peak / largest_tensor:.1f}x the largest tensor")


if __name__ == "__main__":
    main()
