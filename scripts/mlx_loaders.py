"""packq's MLX output loaded by mlx-lm itself, against a float reference and against mlx-lm's own loading.

Two phases, two environments (mlx-lm needs Python >= 3.11 and transformers >= 5.7; the producers are
GPTQModel 7.6.0 and compressed-tensors 0.20.1):

    # sources: a tiny Llama quantized by GPTQModel to AWQ, GPTQ v1, GPTQ v2 (scripts/real_loaders.py's
    # make_float and quantize, in GPTQModel's environment), into WORK/gptqmodel-{awq,gptq,gptq_v2}
    .venv/bin/python scripts/mlx_loaders.py convert --work WORK      # packq + compressed-tensors
    MLX/bin/python scripts/mlx_loaders.py load --work WORK --out benchmarks/results/mlx_loaders.json

``convert`` adds compressed-tensors made by the library's own AutoAWQConverter from the AWQ source and a
tiny Mixtral (GPTQ v2, made here with packq, 2 experts per layer), then converts every source with
packq to MLX (float32 scales, the default; and --mlx-scales float16) with --verify, and to float32 (the
reference: the same weights, dequantized, (q - z) * s exact in float32). ``load`` loads each MLX folder
with mlx_lm (``mlx_lm.load`` where the folder has a tokenizer, else ``mlx_lm.utils.load_model``) and
checks: every quantized layer's ``mx.dequantize`` against the reference (bit for bit in float32, or the
count of weights that differ once rounded to float16, against what packq reported); the logits of a
fixed prompt against the float reference run by mlx-lm (tolerance TOL, argmax identical); and what
mlx-lm's own loading of the source gives (its AWQ/GPTQ path, or its compressed-tensors path).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: logits of packq's MLX model against the float reference: |difference| <= TOL * max |reference logit|
TOL = 1e-3
PROMPT = [1, 5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12]
SOURCES = {"awq": "gptqmodel-awq", "gptq_v1": "gptqmodel-gptq", "gptq_v2": "gptqmodel-gptq_v2",
           "compressed-tensors": "ct-library", "mixtral_gptq_v2": "mixtral-gptq_v2"}


def packq(*args: str) -> tuple[int, dict | str]:
    p = subprocess.run([sys.executable, "-m", "packq.cli", *args, "--json", "--no-progress"], capture_output=True,
                       text=True, cwd=REPO)
    return p.returncode, json.loads(p.stdout) if p.returncode == 0 else p.stderr.strip()


def make_mixtral(dst: Path) -> None:
    """A tiny Mixtral (2 layers, 2 experts), every Linear but the router quantized as GPTQ v2, 4-bit, group 64."""
    import numpy as np
    from safetensors.numpy import save_file

    import packq as pq

    rng = np.random.default_rng(5)
    h, inter, vocab, layers, experts, g = 128, 256, 64, 2, 2, 64
    tensors: dict[str, np.ndarray] = {}

    def linear(name: str, k: int, n: int) -> None:
        q = rng.integers(0, 16, (k, n))
        z = rng.integers(0, 16, (k // g, n))
        tensors[f"{name}.qweight"] = pq.pack(q, "row")
        tensors[f"{name}.qzeros"] = pq.pack(z, "column")
        tensors[f"{name}.scales"] = (rng.random((k // g, n)) * 0.02 + 0.002).astype(np.float16)
        tensors[f"{name}.g_idx"] = (np.arange(k) // g).astype(np.int32)

    tensors["model.embed_tokens.weight"] = rng.normal(0, 0.5, (vocab, h)).astype(np.float16)
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for n, (k, out) in {"q_proj": (h, h), "k_proj": (h, h // 2), "v_proj": (h, h // 2), "o_proj": (h, h)}.items():
            linear(f"{p}.self_attn.{n}", k, out)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = rng.normal(0, 0.1, (experts, h)).astype(np.float16)
        for e in range(experts):
            for w, (k, out) in {"w1": (h, inter), "w2": (inter, h), "w3": (h, inter)}.items():
                linear(f"{p}.block_sparse_moe.experts.{e}.{w}", k, out)
        tensors[f"{p}.input_layernorm.weight"] = np.ones(h, np.float16)
        tensors[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float16)
    tensors["model.norm.weight"] = np.ones(h, np.float16)
    tensors["lm_head.weight"] = rng.normal(0, 0.2, (vocab, h)).astype(np.float16)
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 128, "tie_word_embeddings": False,
              "torch_dtype": "float16",
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False,
                                      "sym": False, "checkpoint_format": "gptq_v2"}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def convert(work: Path) -> None:
    if not (work / "ct-library").exists():
        from compressed_tensors.entrypoints.convert import convert_checkpoint as ct_convert
        from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

        src = work / "gptqmodel-awq"
        ct_convert(str(src), str(work / "ct-library"), AutoAWQConverter.from_pretrained(str(src)), max_workers=1,
                   device="cpu")
    if not (work / "mixtral-gptq_v2").exists():
        make_mixtral(work / "mixtral-gptq_v2")
    out = {}
    for case, folder in SOURCES.items():
        src = work / folder
        res = {}
        for tag, extra in (("mlx", []), ("mlx-float16", ["--mlx-scales", "float16"])):
            t = time.perf_counter()
            res[tag] = packq("convert", str(src), str(work / f"{folder}.{tag}"), "--to", "mlx", "--verify", "--force",
                             *extra)[1]  # the summary, or packq's one line
            res[f"{tag}_seconds"] = round(time.perf_counter() - t, 2)
        res["float32"] = packq("convert", str(src), str(work / f"{folder}.float32"), "--to", "float32", "--force")[1]
        out[case] = res
    (work / "packq.json").write_text(json.dumps(out, indent=2))


def _layers(model):
    import mlx.nn as nn

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear,))} | {
        name: m for name, m in model.named_modules() if type(m).__name__ == "QuantizedSwitchLinear"}


def _dequantized(m):
    import mlx.core as mx

    return mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)


def _reference(folder: Path) -> dict:
    import mlx.core as mx

    ref = {}
    for f in sorted(folder.glob("*.safetensors")):
        ref.update(mx.load(str(f)))
    return ref


def _ref_weight(ref: dict, name: str, model_type: str):
    """The reference float32 weight of an mlx-lm layer name (Mixtral's switch_mlp: the experts stacked)."""
    import mlx.core as mx

    if ".switch_mlp." in name:
        prefix, proj = name.split(".switch_mlp.")
        w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
        e = 0
        stack = []
        while f"{prefix}.experts.{e}.{w}.weight" in ref:
            stack.append(ref[f"{prefix}.experts.{e}.{w}.weight"])
            e += 1
        return mx.stack(stack)
    return ref[f"{name}.weight"]


def _load(folder: Path):
    from mlx_lm.utils import load_model

    if (folder / "tokenizer.json").exists():
        import mlx_lm

        model, _tokenizer = mlx_lm.load(str(folder))
        return model, "mlx_lm.load"
    model, _ = load_model(folder)
    return model, "mlx_lm.utils.load_model"


def _logits(model):
    import mlx.core as mx

    return mx.array(model(mx.array([PROMPT])).astype(mx.float32))


def compare(folder: Path, ref: dict, model_type: str, source_dtype: str) -> dict:
    """Load ``folder`` with mlx-lm; every quantized layer's mx.dequantize (on the CPU) rounded to the source's dtype,
    against the float32 reference rounded alike (the source's own weights), bit for bit."""
    import mlx.core as mx
    import numpy as np

    model, how = _load(folder)
    layers = _layers(model)
    as_source = getattr(mx, source_dtype)
    equal, differing, total, dtypes = 0, 0, 0, set()
    for name, m in layers.items():
        got = np.array(_dequantized(m).astype(as_source).astype(mx.float32))
        dtypes.add(str(m.scales.dtype).rsplit(".", 1)[-1])
        want = np.array(_ref_weight(ref, name, model_type).astype(as_source).astype(mx.float32))
        d = int(np.count_nonzero(got != want))
        equal += d == 0
        differing += d
        total += want.size
    return {"loaded": True, "how": how, "quantized_layers": len(layers), "layers_bit_equal": equal,
            "weights": total, "weights_differing": differing, "scales_dtypes": sorted(dtypes), "model": model}


def load(work: Path, out: Path) -> None:
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    import transformers

    conversions = json.loads((work / "packq.json").read_text())
    report = {"machine": "this project's 2-core AMD EPYC CPU (Linux x86-64), mlx CPU backend",
              "date": time.strftime("%Y-%m-%d"), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
              "transformers": transformers.__version__, "tolerance": TOL, "prompt": PROMPT, "cases": {}}
    for case, folder in SOURCES.items():
        conv = conversions[case]
        src = work / folder
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
        ref = _reference(work / f"{folder}.float32")
        ref_model, _ = _load(work / f"{folder}.float32")
        ref_logits = np.array(_logits(ref_model))
        entry: dict = {"model_type": model_type}
        for tag in ("mlx", "mlx-float16"):
            summary = conv[tag]
            if not isinstance(summary, dict):
                entry[tag] = {"packq_exit": 2, "packq_said": summary}
                continue
            source_dtype = summary["mlx"]["source_dtype"]
            r = compare(work / f"{folder}.{tag}", ref, model_type, source_dtype)
            logits = np.array(_logits(r.pop("model")))
            scale = float(np.abs(ref_logits).max())
            r.update(packq_exit=0, packq_verified=summary["verified"], packq_differing=summary["mlx"]["differing"],
                     source_dtype=source_dtype,
                     packq_seconds=conv[f"{tag}_seconds"],
                     logits_max_abs_diff=float(np.abs(logits - ref_logits).max()), reference_max_abs_logit=scale,
                     argmax_identical=bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()))
            entry[tag] = r
        try:  # mlx-lm's own loading of the source
            r = compare(src, ref, model_type, conv["mlx"]["mlx"]["source_dtype"])
            r.pop("model")
            entry["mlx_lm_own"] = r
        except Exception as e:  # noqa: BLE001 - what mlx-lm says is the result
            entry["mlx_lm_own"] = {"loaded": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        report["cases"][case] = entry
        print(case, json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "how"} if isinstance(v, dict) else v
                                for k, v in entry.items()}), flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["convert", "load"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mlx_loaders.json")
    a = ap.parse_args()
    convert(a.work) if a.phase == "convert" else load(a.work, a.out)


if __name__ == "__main__":
    main()
