"""packq's GGUF files in llama.cpp itself, from checkpoints made by a real producer, beside llama.cpp's own route.

Three environments, each too heavy for CI (tests/test_real_loaders.py runs this opt-in, marker ``real_loaders``):

- this script's own Python: packq with its ``gguf`` and ``test`` extras (torch, transformers, tokenizers);
- ``--producer``: a Python with GPTQModel 7.6.0 and transformers 5.24.0 (torch 2.13 CPU), which quantizes;
- ``--llama``: a Python with llama-cpp-python 0.3.36 built from its source distribution (it vendors llama.cpp
  0c1e570), which loads and runs the GGUF files; ``--llama-cpp-src`` its unpacked llama.cpp (for llama.cpp's
  own converter, convert_hf_to_gguf.py, and its models/ggml-vocab-*.gguf: real tokenizers' vocabularies).

    GPTQMODEL_CPU_WORKERS=2 .venv/bin/python scripts/real_loaders_gguf.py --producer /work/kit/venv-gptqmodel/bin/python \\
        --llama /work/kit/gguf/venv/bin/python --llama-cpp-src /work/kit/gguf/src/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --out benchmarks/results/real_loaders_gguf.json

For each of a tiny Llama 3 (Llama 3's tokenizer, GQA, Llama 3.1 rope scaling), a tiny Qwen3 (Qwen2's tokenizer,
explicit head_dim, tied embeddings) and a tiny Qwen3-MoE (4 experts, top 2), with random float16 weights: GPTQModel
quantizes it to AWQ (gemm, asymmetric), GPTQ symmetric and GPTQ asymmetric (4-bit, group 128); packq converts each
with ``--to gguf --verify`` (auto: Q4_0 where symmetric, Q5_0 where not) and dequantizes it with ``--to float32``
(the exact weights). Then:

- llama.cpp loads packq's file, tokenizes texts as the source's tokenizer does, and its logits on a prompt are
  compared with transformers' float32 logits of the exact weights (the float reference);
- llama.cpp's own converter (convert_hf_to_gguf.py) on the dequantized float model writes F32 (its tensors must equal
  packq's dequantized GGUF tensors bit for bit: the same names, rotary permutation and expert stacking);
  llama.cpp's quantizer (llama-quantize) makes Q8_0 and Q4_0 of its F32: how many weights of each differ from the source's, and its logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CALIBRATION = ["the quick brown fox jumps over the lazy dog " * 4, "packq converts quantized checkpoints exactly " * 4,
               "Quantized weights should stay the weights they were when a file changes its format. " * 3,
               "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 3] * 32
TEXTS = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines\n",
         "numbers 3 33 333 3333 12345678 3.14159 and 0x1F; I've been 'told he's there, 'RE you sure?",
         "def f(x):\n    return x ** 2  # comment\n",
         "Ünïcödé: café, naïve, Straße; русский текст; 日本語のテキスト; 我想在apple工作; emoji 🦙🚀😁",
         "<|im_start|>user\nspecial tokens in text<|im_end|>"]
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
MODELS = {
    # name: (transformers config class, config, ggml vocab file, tokenizer fix-up)
    "llama": ("LlamaConfig", {
        "vocab_size": 128256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}, "llama-bpe", "llama3"),
    "qwen3": ("Qwen3Config", {
        "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True}, "qwen2", None),
    "qwen3moe": ("Qwen3MoeConfig", {
        "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False}, "qwen2", None),
    # Mistral as mistralai ships v0.3's layout (GQA, rope theta 1e6, no sliding window) but with Llama 3's BPE
    # tokenizer: llama.cpp's Llama SentencePiece vocabulary would need a tokenizer.model, which packq's GGUF writer
    # reads and these vocab files do not carry
    "mistral": ("MistralConfig", {
        "vocab_size": 128256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001}, "llama-bpe", "llama3"),
    # Qwen2 (Qwen2.5's layout): biased q/k/v projections, tied embeddings, Qwen2's tokenizer
    "qwen2": ("Qwen2Config", {
        "vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "use_sliding_window": False, "tie_word_embeddings": True}, "qwen2", None),
}
QUANTS = ("awq", "gptq-sym", "gptq-asym")


# --- in this script's Python ------------------------------------------------------------------------


def make_tokenizer(vocab_gguf: Path, fix: str | None, out: Path) -> None:
    """A real tokenizer folder from llama.cpp's vocab-only GGUF (transformers reads a GGUF vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vocab_gguf.parent), gguf_file=vocab_gguf.name)
    tok.save_pretrained(out)
    if fix == "llama3":
        # as Meta ships it: merges ignored for whole-vocabulary words, BOS added (the GGUF vocabulary keeps neither)
        path = out / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model"]["ignore_merges"] = True
        # transformers' reading of the GGUF vocabulary appends an <|endoftext|> Meta's tokenizer does not have
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 128256]
        bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
        data["post_processor"] = {
            "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}}}
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def make_float(name: str, src: Path, out: Path) -> None:
    """A tiny model of ``name`` with random float16 weights and a real tokenizer."""
    import shutil

    import torch
    import transformers

    cls, config, vocab, fix = MODELS[name]
    out.mkdir(parents=True)
    make_tokenizer(src / "models" / f"ggml-vocab-{vocab}.gguf", fix, out)
    cfg = getattr(transformers, cls)(**config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float16)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 2 or "experts" in pname or pname.endswith(".bias"):  # biases (qwen2's q/k/v) init to 0
                p.normal_(0, 0.05)  # larger than the default init: logits that tell models apart
            if "embed_tokens" in pname:
                p.normal_(0, 1.0)
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)


def packq(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "packq", *args, "--no-progress"], capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def exact_float32(src: Path, folder: Path) -> int:
    """Rewrite the quantized linears of ``folder`` (packq's ``--to float32`` of ``src``, which holds the float16
    rounding of (q - z) * s that AWQ/GPTQ engines compute) with the exact products in float32: packq's dequantizers
    given the scales widened to float32, which hold every product exactly. The float reference, and the input of
    llama.cpp's own converter, are then the weights the source's integers and scales say."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    import packq

    config = json.loads((src / "config.json").read_text())
    awq = config["quantization_config"]["quant_method"] == "awq"
    stored: dict = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:  # AWQ_TORCH writes bfloat16 scales: read through torch, widen to float32
            stored |= {k: (h.get_tensor(k).float() if k.endswith(".scales") else h.get_tensor(k)).numpy()
                       for k in h.keys() if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    out = folder / "model.safetensors"
    tensors = load_torch(str(out))  # torch: bfloat16 plain tensors kept as they are
    done = 0
    for name in [k[: -len(".qweight")] for k in stored if k.endswith(".qweight")]:
        qw, qz, sc = stored[name + ".qweight"], stored[name + ".qzeros"], stored[name + ".scales"].astype(np.float32)
        if awq:
            w = packq.dequantize_awq(qw, qz, sc)
        else:  # GPTQModel writes v1 zeros with one whole-word subtraction (packq's "word" convention)
            w = packq.dequantize_gptq(qw, packq.zeros_v1_to_v2(qz, convention="word"), sc, stored.get(name + ".g_idx"),
                                      zeros="v2")
        w = np.ascontiguousarray(np.asarray(w, np.float32).T)
        assert tensors[name + ".weight"].shape == w.shape and np.abs(tensors[name + ".weight"].numpy() - w).max() < 1e-3
        tensors[name + ".weight"] = torch.from_numpy(w)
        done += 1
    save_torch(tensors, str(out), metadata={"format": "pt"})
    return done


def reference_logits(folder: Path, ids: list[int]) -> list[list[float]]:
    """transformers' float32 logits of a float checkpoint (the float reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().tolist()


def hf_tokenize(folder: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tok.encode(t).ids for t in texts]


def gguf_weights(path: Path) -> dict:
    """Every 2-D/3-D tensor of a GGUF file, dequantized by gguf-py (ggml's arithmetic, in NumPy), and its type."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) >= 2:
            out[t.name] = (t.tensor_type.name, np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    return out


def logit_stats(a, b) -> dict:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {"max_abs_diff": float(np.abs(a - b).max()),
            "relative_rms_error": float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean())),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def bits_per_weight(path: Path, weights: dict) -> dict:
    """Bytes of the quantized linear tensors of a file, per weight; and of the whole file per parameter."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    lin = [t for t in r.tensors if t.name in weights]
    total = sum(int(t.n_elements) for t in r.tensors)
    return {"linear_bits_per_weight": 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin),
            "file_bits_per_parameter": 8 * path.stat().st_size / total, "file_bytes": path.stat().st_size}


def source_bits(folder: Path) -> float:
    """Bits per weight of the source's quantized modules (qweight, qzeros, scales, g_idx stored)."""
    from safetensors import safe_open

    stored = weights = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as s:
            for k in s.keys():
                if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                    a = s.get_slice(k)
                    n = 1
                    for d in a.get_shape():
                        n *= d
                    stored += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[a.get_dtype()]
                    if k.endswith(".qweight"):
                        shape = a.get_shape()
                        weights += shape[0] * shape[1] * 8  # 4-bit: 8 per int32 word
    return 8 * stored / weights


def compare_weights(route: dict, exact: dict) -> dict:
    """How many quantized-linear weights of a route's file differ from packq's (the source's exact weights)."""
    import numpy as np

    changed = total = 0
    worst = 0.0
    for name, (_, w) in exact.items():
        other = route[name][1].reshape(w.shape)
        changed += int((other != w).sum())
        total += w.size
        worst = max(worst, float(np.abs(other - w).max()))
    return {"weights_changed": changed / total, "weights_max_abs_diff": worst, "tensors": len(exact),
            "types": sorted({route[n][0] for n in exact})}


def run_llama(llama_py: str, path: Path, ids: list[int], texts: list[str]) -> dict:
    """Load a GGUF file in llama-cpp-python, tokenize ``texts``, and return its logits on ``ids`` (all positions)."""
    code = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, ids, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False, seed=0)
toks = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts]
llm.eval(ids)
logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
print(json.dumps({"version": llama_cpp.__version__, "tokens": toks, "logits": logits.tolist()}))
"""
    p = subprocess.run([llama_py, "-c", code, str(path), json.dumps(ids), json.dumps(texts)], capture_output=True,
                       text=True)
    if p.returncode:
        return {"loaded": False, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {"loaded": True, **json.loads(p.stdout.strip().splitlines()[-1])}


def vocab_tests(args, work: Path, name: str, kind: str) -> dict:
    """llama.cpp's own tokenizer test set for the model's vocabulary (models/ggml-vocab-*.gguf.inp, and .out: the
    ids the original Hugging Face tokenizer gave, without special tokens): the source folder's tokenizer and
    llama.cpp on packq's GGUF file both against it."""
    vocab = MODELS[name][2]
    base = Path(args.llama_cpp_src) / "models" / f"ggml-vocab-{vocab}.gguf"
    texts = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(i) for i in line.split()] for line in base.with_suffix(".gguf.out").read_text().split("\n")[: len(texts)]]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / f"{name}-{kind}" / "tokenizer.json"))
    source = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    code = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=False) for t in json.loads(sys.argv[2])]))
"""
    p = subprocess.run([args.llama, "-c", code, str(work / f"{name}-{kind}.gguf"), json.dumps(texts)],
                       capture_output=True, text=True, check=True)
    ours = json.loads(p.stdout.strip().splitlines()[-1])
    return {"vocab": f"ggml-vocab-{vocab}.gguf", "texts": len(texts),
            "source_tokenizer_as_expected": sum(a == b for a, b in zip(source, want)),
            "llama_cpp_on_packq_gguf_as_expected": sum(a == b for a, b in zip(ours, want)),
            "llama_cpp_on_packq_gguf_as_source_tokenizer": sum(a == b for a, b in zip(ours, source))}


def llama_quantize(llama_py: str, src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, as llama-quantize): F32 GGUF -> ``ftype``."""
    code = r"""
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 2
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) == 0
"""
    subprocess.run([llama_py, "-c", code, str(src), str(dst), str(ftype)], check=True, capture_output=True)


def llama_cpp_convert(src_dir: Path, folder: Path, out: Path, outtype: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(src_dir / "gguf-py")}
    p = subprocess.run([sys.executable, str(src_dir / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                        "--outtype", outtype], capture_output=True, text=True, env=env)
    return p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1][:300] if p.returncode else ""


# --- in the producer's Python --------------------------------------------------------------------------


def quantize(src: Path, dst: Path, kind: str) -> None:
    """GPTQModel 7.6.0: AWQ gemm (asymmetric), GPTQ symmetric or asymmetric, 4-bit, group 128."""
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    if kind == "awq":
        qc = QuantizeConfig(bits=4, group_size=128, sym=False, desc_act=False, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
        kw = {"backend": BACKEND.AWQ_TORCH}
    else:
        qc = QuantizeConfig(bits=4, group_size=128, sym=kind == "gptq-sym", desc_act=False, format=FORMAT.GPTQ)
        kw = {}
    model = GPTQModel.load(str(src), quantize_config=qc, device="cpu")
    model.quantize(calibration=CALIBRATION, calibration_concat_size=0, **kw)
    model.save(str(dst))


# --- the run -----------------------------------------------------------------------------------------------


def case(args, work: Path, name: str, kind: str, report: dict) -> dict:
    done = work / "results" / f"{name}-{kind}.json"
    if done.exists():  # a resumed run: this case's result as measured
        saved = json.loads(done.read_text())
        report.setdefault("llama_cpp_python", saved.pop("llama_cpp_python", None))
        return saved
    out = _case(args, work, name, kind, report)
    done.parent.mkdir(exist_ok=True)
    done.write_text(json.dumps({**out, "llama_cpp_python": report.get("llama_cpp_python")}, indent=1))
    return out


def _case(args, work: Path, name: str, kind: str, report: dict) -> dict:
    src = work / f"{name}-{kind}"
    out: dict = {"model": name, "quantization": kind}
    if not src.exists():
        cwd = work / "producer"
        cwd.mkdir(exist_ok=True)
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import real_loaders_gguf as r; from pathlib import Path; "
                f"r.quantize(Path({str(work / f'{name}-float')!r}), Path({str(src)!r}), {kind!r})")
        p = subprocess.run([args.producer, "-c", code], capture_output=True, text=True, cwd=cwd)
        if p.returncode:
            out["producer_error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
            return out
    info = json.loads(subprocess.run([sys.executable, "-m", "packq", "inspect", str(src), "--json"],
                                     capture_output=True, text=True).stdout)
    out["source"] = {"format": info["format"], "quantized_modules": info["quantized_modules"],
                     "bits_per_weight": source_bits(src)}
    gg, f32 = work / f"{name}-{kind}.gguf", work / f"{name}-{kind}-float32"
    code, said = packq("convert", str(src), str(gg), "--to", "gguf", "--verify", "--force", "--json")
    out["packq_exit"] = code
    if code:
        out["packq_said"] = said.splitlines()[-1][:300]
        return out
    summary = json.JSONDecoder().raw_decode(said[said.index("{"):])[0]
    out["packq_summary"] = {k: summary[k] for k in ("types", "verified", "bits_per_weight_in", "bits_per_weight_out",
                                                    "max_weight_error", "bytes_in", "bytes_out")}
    code, said = packq("convert", str(src), str(f32), "--to", "float32", "--force")
    assert code == 0, said
    out["exact_float32_modules"] = exact_float32(src, f32)
    tok_ids = hf_tokenize(src, TEXTS)
    ids = hf_tokenize(src, [PROMPT])[0]
    ref = reference_logits(f32, ids)
    # the quantized modules' tensors (the blocks packq chose), not the plain ones (norms, the MoE router)
    exact = {n: w for n, w in gguf_weights(gg).items() if w[0] in ("Q4_0", "Q5_0", "Q8_0")}
    out["packq_gguf"] = {**bits_per_weight(gg, exact), "types": sorted({t for t, _ in exact.values()})}
    res = run_llama(args.llama, gg, ids, TEXTS)
    report.setdefault("llama_cpp_python", res.get("version"))
    out["packq_gguf"]["loaded"] = res["loaded"]
    if res["loaded"]:
        out["packq_gguf"]["tokenizes_as_source"] = res["tokens"] == tok_ids
        out["packq_gguf"]["texts"] = len(TEXTS)
        out["packq_gguf"]["logits_vs_float_reference"] = logit_stats(res["logits"], ref)
    else:
        out["packq_gguf"]["error"] = res["error"]
    # llama.cpp's own route, on the same weights: its converter on the exact float model, then its quantizer
    routes = {}
    f32_gguf = work / f"{name}-{kind}-llamacpp-f32.gguf"
    code, said = llama_cpp_convert(Path(args.llama_cpp_src), f32, f32_gguf, "f32")
    if code:
        routes["convert_hf_to_gguf f32"] = {"error": said}
    else:
        for label, path in (("convert_hf_to_gguf f32", f32_gguf),
                            ("llama-quantize q8_0 (of its f32)", work / f"{name}-{kind}-llamacpp-q8_0.gguf"),
                            ("llama-quantize q4_0 (of its f32)", work / f"{name}-{kind}-llamacpp-q4_0.gguf")):
            if "q8_0" in label:
                llama_quantize(args.llama, f32_gguf, path, 7)  # LLAMA_FTYPE_MOSTLY_Q8_0
            elif "q4_0" in label:
                llama_quantize(args.llama, f32_gguf, path, 2)  # LLAMA_FTYPE_MOSTLY_Q4_0
            r = compare_weights(gguf_weights(path), exact)
            r.update(bits_per_weight(path, exact))
            res = run_llama(args.llama, path, ids, TEXTS)
            r["loaded"] = res["loaded"]
            if res["loaded"]:
                r["tokenizes_as_source"] = res["tokens"] == tok_ids
                r["logits_vs_float_reference"] = logit_stats(res["logits"], ref)
            routes[label] = r
    out["llama_cpp_route"] = routes
    return out


def table(report: dict) -> str:
    """The Markdown tables docs/gguf-engines.md quotes, from a results file (``--table FILE``)."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = ["| model | source (GPTQModel) | source bits/weight | packq GGUF | bits/weight | tokenizes as source "
            "| logits vs float reference: rel. RMS error, argmax agreement |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["cases"]:
        g = c["packq_gguf"]
        e = g["logits_vs_float_reference"]
        rows.append(f"| {c['model']} | {c['quantization']} | {c['source']['bits_per_weight']:.3f} | {g['types'][0]} "
                    f"| {g['linear_bits_per_weight']} | {'yes' if g['tokenizes_as_source'] else 'NO'} "
                    f"| {pct(e['relative_rms_error'])}, {pct(e['argmax_agreement'])} |")
    rows += ["", "| model | source | llama.cpp's route | bits/weight | weights changed | largest change "
             "| logits vs float reference: rel. RMS error, argmax agreement |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["cases"]:
        for label, r in c["llama_cpp_route"].items():
            e = r["logits_vs_float_reference"]
            rows.append(f"| {c['model']} | {c['quantization']} | {label} | {r['linear_bits_per_weight']} "
                        f"| {pct(r['weights_changed'])} | {r['weights_max_abs_diff']:.3g} "
                        f"| {pct(e['relative_rms_error'])}, {pct(e['argmax_agreement'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--producer", help="Python with gptqmodel 7.6.0")
    ap.add_argument("--llama", help="Python with llama-cpp-python 0.3.36")
    ap.add_argument("--llama-cpp-src", help="llama.cpp as llama-cpp-python 0.3.36 vendors it")
    ap.add_argument("--table", type=Path, help="print the Markdown tables of a results file, and stop")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--cases", default=",".join(f"{m}:{q}" for m in MODELS for q in QUANTS),
                    help="model:quantization pairs, comma-separated (default: all fifteen)")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if not (args.producer and args.llama and args.llama_cpp_src):
        ap.error("--producer, --llama and --llama-cpp-src are needed for a run")
    work = args.work or Path(tempfile.mkdtemp(prefix="packq-gguf-loaders-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import platform

    import gguf
    import tokenizers
    import transformers

    producer = subprocess.run([args.producer, "-c", "import gptqmodel, transformers; print(gptqmodel.__version__, "
                               "transformers.__version__)"], capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
    report: dict = {"gptqmodel": producer[0], "transformers_producer": producer[1], "transformers": transformers.__version__,
                    "gguf_py": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
                    "tokenizers": tokenizers.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d"), "cases": [],
                    "packq_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                   capture_output=True, text=True).stdout.strip()}
    for pair in args.cases.split(","):
        name, kind = pair.split(":")
        if not (work / f"{name}-float").exists():
            make_float(name, Path(args.llama_cpp_src), work / f"{name}-float")
        c = case(args, work, name, kind, report)
        report["cases"].append(c)
        print(json.dumps(c, indent=1), flush=True)
        if args.out:  # partial results survive an interrupted run
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**report, "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    report["vocab_tests"] = {}
    for c in report["cases"]:
        if c["model"] not in report["vocab_tests"] and c.get("packq_exit") == 0:
            report["vocab_tests"][c["model"]] = vocab_tests(args, work, c["model"], c["quantization"])
    print(json.dumps(report["vocab_tests"], indent=1), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
