"""Convert a synthetic ~1 GB AWQ checkpoint with `packq convert`; compare with `cp -r` and the largest shard.

    python benchmarks/bench_convert.py [--size-gb 1.0] [--backend numpy] [--targets gptq,compressed-tensors,float16]

Prints, from one run: each conversion's wall time against the floor of writing its bytes, timed
interleaved with it (repetition by repetition, page cache warm for both; medians): for the packed
targets `cp -r SRC DST && sync` of the source folder, for the float targets `cp -r` of that
repetition's own output and `sync` (packq fsyncs what it writes, so the copy is made durable too), and
that too for a packed target writing more than 1.2x the source's bytes (GGUF Q5_0, Q8_0);
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


def make(root: Path, size_gb: float, symmetric: bool = False) -> tuple[int, int]:
    """A Llama-7B-shaped AWQ checkpoint of random words, one shard per two layers; (largest shard, largest tensor).

    ``symmetric``: every zero-point 8 (the words 0x88888888), the other tensors as without it (the same random
    stream), so that GGUF's Q4_0 holds it; the asymmetric source's q - z reach [-15, 15] (Q5_0)."""
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
            data = (rng.integers(0, 256, nbytes, dtype=np.uint8) if dtype != "F16"
                    else (rng.random(shape) * 0.01).astype(np.float16))
            w.write(name, np.full(nbytes, 0x88, dtype=np.uint8) if symmetric and name.endswith("qzeros") else data)
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


def llama(src: Path, root: Path) -> None:
    """``src`` as the GGUF target needs it, beside it: its shards and index hard-linked (the same bytes, so that the
    other targets' outputs stay as they were), config.json with the Llama fields gguf_model reads, and a small
    byte-level BPE tokenizer.json (a GGUF file carries its tokenizer; the synthetic checkpoint has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.link(f, root / f.name)
    config = json.loads((src / "config.json").read_text())
    layers = 1 + max(int(n.split(".")[2]) for n in json.loads((src / "model.safetensors.index.json").read_text())
                     ["weight_map"] if n.startswith("model.layers."))
    config |= {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
               "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HIDDEN // 128,
               "num_key_value_heads": HIDDEN // 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    (root / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "the quick brown fox jumps over the lazy dog; packq writes GGUF files exactly, 0123456789 Hello, World! "
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text * 4], trainer)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))


CHILD = """
import resource, sys
from packq.cli import main
rc = main()  # the program as its users run it: arguments from sys.argv
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


#: what each target passes to packq convert (v1 per field: the example's routes all read it alike)
TARGETS = {"gptq": ["--for", "tgi"], "compressed-tensors": ["--to", "compressed-tensors"],
           "float16": ["--to", "float16"], "bfloat16": ["--to", "bfloat16"], "float32": ["--to", "float32"],
           # GGUF: auto gives the asymmetric source Q5_0; Q4_0 from the symmetric one; F16/BF16 round once (inexact)
           "gguf-q4_0": ["--to", "gguf", "--gguf-type", "q4_0"], "gguf-q5_0": ["--to", "gguf"],
           "gguf-q8_0": ["--to", "gguf", "--gguf-type", "q8_0"],
           "gguf-f16": ["--to", "gguf", "--gguf-type", "f16", "--allow-inexact"],
           "gguf-bf16": ["--to", "gguf", "--gguf-type", "bf16", "--allow-inexact"],
           "gguf-f32": ["--to", "gguf", "--gguf-type", "f32"],
           # MLX affine (MLX's float form is --to float16/bfloat16/float32: mlx-lm loads those folders as they are)
           "mlx": ["--to", "mlx"], "mlx-f16": ["--to", "mlx", "--mlx-scales", "float16"]}
#: floor: cp -r of the target's own output (float outputs); the others: cp -r SRC DST (relayouts)
#: a target writing more than this many times the source's bytes is timed against a copy of its own output too
BIGGER = 1.2
FLOATS = ("float16", "bfloat16", "float32", "gguf-f16", "gguf-bf16", "gguf-f32")
#: the source each target reads: the AWQ checkpoint, it with Llama's config and a tokenizer, or its symmetric variant
SOURCES = {t: "llama" for t in TARGETS if t.startswith("gguf")} | {"gguf-q4_0": "llama-sym"}


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
    """Every file's SHA-256 (so that a verified output need not stay on disk beside the timed ones); a .gguf: its own."""
    out = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        out[f.name if folder.is_dir() else ".gguf"] = h.hexdigest()
    return out


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _out(tmp: str, name: str, target: str) -> Path:
    """The target's DST: a folder, or one .gguf file."""
    return Path(tmp) / (f"{name}.gguf" if target.startswith("gguf") else name)


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
        sources = {"src": src}
        if any(SOURCES.get(t) == "llama" for t in targets):
            llama(src, Path(tmp) / "llama")
            sources["llama"] = Path(tmp) / "llama"
        if any(SOURCES.get(t) == "llama-sym" for t in targets):
            make(Path(tmp) / "sym", args.size_gb, symmetric=True)
            llama(Path(tmp) / "sym", Path(tmp) / "llama-sym")
            shutil.rmtree(Path(tmp) / "sym")  # its files live on as hard links in llama-sym
            sources["llama-sym"] = Path(tmp) / "llama-sym"
        child = [sys.executable, "-c", CHILD, "convert"]

        def source(target: str) -> str:
            return str(sources[SOURCES.get(target, "src")])
        verified: dict[str, dict[str, str]] = {}
        for target in targets:  # bit-exactness first: one verified conversion per target, untimed
            out = _out(tmp, f"verified-{target}", target)
            r = subprocess.run([*child, source(target), str(out), "--backend", args.backend, "--verify", *TARGETS[target]],
                               capture_output=True, text=True)
            assert r.returncode == 0 and "verified" in r.stdout, r.stdout + r.stderr
            verified[target] = _digest(out)
            _remove(out)
        cp_t: list[float] = []
        own_t: dict[str, list[float]] = {t: [] for t in targets}
        sizes: dict[str, int] = {}
        conv_t: dict[str, list[float]] = {t: [] for t in targets}
        peaks: dict[str, list[int]] = {t: [] for t in targets}
        for i in range(args.repeat):  # interleaved, so that drifts of a shared machine hit every row alike
            t, _ = _timed(["sh", "-c", f"cp -r '{src}' '{tmp}/copy{i}' && sync"], row="cp")
            cp_t.append(t)
            shutil.rmtree(f"{tmp}/copy{i}")
            for target in targets:
                out = _out(tmp, f"out{i}", target)
                t, r = _timed([*child, source(target), str(out), "--backend", args.backend, *TARGETS[target]], row=target)
                assert r.returncode == 0, r.stderr
                conv_t[target].append(t)
                peaks[target].append(int(r.stderr.split("PEAK_RSS_KB")[1].split()[0]) * 1024)
                sizes[target] = sum(f.stat().st_size for f in (out.rglob("*") if out.is_dir() else [out]) if f.is_file())
                # the floor of writing these bytes: a copy of this very output, made durable; for the float targets,
                # and for those that write notably more than the source (GGUF Q5_0's 5.5 and Q8_0's 8.5 bits a weight)
                if target in FLOATS or sizes[target] > BIGGER * total:
                    copy = _out(tmp, f"copy{i}", target)
                    t, _ = _timed(["sh", "-c", f"cp -r '{out}' '{copy}' && sync"], row=f"own {target}")
                    own_t[target].append(t)
                    _remove(copy)
                assert _digest(out) == verified[target], f"{target}: run {i} differs from the verified conversion"
                _remove(out)
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
                if own_t[target]:
                    own = statistics.median(own_t[target])
                    print(f"    writes {sizes[target] / total:.2f}x the source's bytes: {m / own:.2f}x cp -r of its own "
                          f"output && sync ({own:.2f} s)")
            print(f"    peak RSS {peak / 1e6:6.0f} MB = {peak / largest_shard:.2f}x the largest shard, "
                  f"{peak / largest_tensor:.1f}x the largest tensor; every output equal to a --verify'd conversion "
                  f"({args.backend} backend, process start and imports included)")


if __name__ == "__main__":
    main()
