"""packq's conversions loaded by real third-party loaders: GPTQModel (producer and loader) and transformers.

Run in an environment with gptqmodel and transformers (they are too heavy for CI; see
tests/test_real_loaders.py, marker ``real_loaders``):

    pip install -c constraints.txt "gptqmodel==7.6.0" "transformers==5.24.0" -e .
    GPTQMODEL_CPU_WORKERS=2 python scripts/real_loaders.py --out benchmarks/results/real_loaders.json

It builds a tiny Llama (2 layers, hidden 256, float16) whose projections hold engineered all-positive
groups of 128 input features, so that min-max quantization stores zero-point 0 there; quantizes it
with GPTQModel to AWQ (gemm), GPTQ v1 (``gptq``) and GPTQ v2 (``gptq_v2``), 4-bit, group 128,
sym=False; converts each with packq; then loads source and result in transformers
(``AutoModelForCausalLM``) and in ``GPTQModel.load`` (transformers alone for the float16 and
compressed-tensors results, which GPTQModel does not load), and compares every decoder linear's
effective weight (the module applied to the identity, minus its bias) bit for bit, and the logits.
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

TEXTS = ["the quick brown fox jumps over the lazy dog " * 4, "packq converts quantized checkpoints exactly " * 4,
         "zero points of zero are legal in awq " * 4] * 43


def make_float(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.05)
                p[:6, :128] = p[:6, :128].abs() + 0.01  # 6 output rows x one group: zero-point 0
    model.save_pretrained(out)


def quantize(src: Path, dst: Path, kind: str) -> None:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    if kind == "awq":
        qc = QuantizeConfig(bits=4, group_size=128, sym=False, desc_act=False, quant_method=METHOD.AWQ,
                            format=FORMAT.GEMM)
        kw = {"backend": BACKEND.AWQ_TORCH}
    else:
        qc = QuantizeConfig(bits=4, group_size=128, sym=False, desc_act=False,
                            format=FORMAT.GPTQ if kind == "gptq" else FORMAT.GPTQ_V2)
        kw = {}
    model = GPTQModel.load(str(src), quantize_config=qc, device="cpu")
    model.quantize(calibration=TEXTS, calibration_concat_size=0, **kw)
    model.save(str(dst))


def _effective(model) -> dict[str, bytes]:
    """Every quantized linear's weight as the loader computes it: module(I) - module(0)."""
    import torch

    out = {}
    for name, m in model.named_modules():
        linear = hasattr(m, "qweight") or isinstance(m, torch.nn.Linear)  # quantized, or a float checkpoint's
        if linear and hasattr(m, "in_features") and ".layers." in f".{name}":
            eye = torch.eye(m.in_features, dtype=torch.float16)
            with torch.no_grad():
                w = m(eye) - m(torch.zeros_like(eye))
            out[name.split("model.", 1)[-1] if name.startswith("model.model.") else name] = w.contiguous()
    return out


def load(path: Path, loader: str):
    """(effective weights, logits) of a checkpoint in one loader, in a fresh process-wide state."""
    import torch

    ids = torch.tensor([[1, 5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12]])
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float16)
    else:
        from gptqmodel import BACKEND, GPTQModel

        backend = BACKEND.AWQ_TORCH if "awq" in json.loads((path / "config.json").read_text())[
            "quantization_config"]["quant_method"] else BACKEND.TORCH
        model = GPTQModel.load(str(path), device="cpu", backend=backend)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    weights = _effective(model)
    return weights, logits


def compare(a: Path, b: Path, loader: str) -> dict:
    """Run each load in its own process (loaders keep global state) and compare."""
    res = {}
    for tag, path in (("a", a), ("b", b)):
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            dump = f.name
        code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import real_loaders as r; "
                f"from pathlib import Path; w, l = r.load(Path({str(path)!r}), {loader!r}); "
                f"torch.save({{'w': w, 'l': l}}, {dump!r})")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if p.returncode:
            return {"loaded": False, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300], "side": tag}
        import torch

        res[tag] = torch.load(dump)
        os.unlink(dump)
    import torch

    wa, wb = res["a"]["w"], res["b"]["w"]
    equal = [n for n in wa if n in wb and torch.equal(wa[n], wb[n])]
    la, lb = res["a"]["l"], res["b"]["l"]
    diff = max(float((wa[n].float() - wb[n].float()).abs().max()) for n in wa if n in wb)
    differing = sum(int((wa[n] != wb[n]).sum()) for n in wa if n in wb) / sum(wa[n].numel() for n in wa)
    return {
        "loaded": True, "modules": len(wa), "modules_bit_equal": len(equal),
        "unequal": sorted(set(wa) - set(equal))[:6], "weights_max_abs_diff": diff, "weights_differing": differing,
        "logits_identical": bool(torch.equal(la, lb)), "logits_max_abs_diff": float((la - lb).abs().max()),
        "argmax_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
    }


def packq(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "packq", *args, "--no-progress"], capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="packq-real-loaders-"))
    t0 = time.time()
    if not (work / "float").exists():
        make_float(work / "float")
    for kind in ("awq", "gptq", "gptq_v2"):
        if not (work / f"gptqmodel-{kind}").exists():
            quantize(work / "float", work / f"gptqmodel-{kind}", kind)

    import gptqmodel
    import transformers

    # (name, source, packq steps (each one convert's arguments), expected to be exact in both loaders).
    # A source and a result of different formats go through different kernels of one loader, which may
    # round the dequantized weights differently; the round trips compare like with like.
    cases = [
        ("AWQ -> GPTQ, --for transformers (writes gptq_v2)", "awq", [["--for", "transformers"]], True),
        ("AWQ -> GPTQ, --for gptqmodel (writes gptq_v2)", "awq", [["--for", "gptqmodel"]], True),
        ("AWQ -> GPTQ v2 (--checkpoint-format gptq_v2)", "awq", [["--checkpoint-format", "gptq_v2"]], True),
        ("GPTQ v1 from GPTQModel -> AWQ (read as GPTQModel wrote it)", "gptq", [["--to", "awq"]], True),
        ("GPTQ v2 from GPTQModel -> AWQ", "gptq_v2", [["--to", "awq"]], True),
        ("AWQ -> GPTQ v2 -> AWQ (like with like)", "awq", [["--for", "transformers"], ["--to", "awq"]], True),
        ("GPTQ v1 from GPTQModel -> AWQ -> GPTQ v2 (like with like)", "gptq",
         [["--to", "awq"], ["--for", "gptqmodel"]], True),
        # packq writes one rounding of (q - z) * s, as compressed-tensors' dequantizer computes it; the
        # quantized kernels round their own way (within 1 ulp), so float16 is close, not bit-equal, there
        ("AWQ -> float16 (dequantized; transformers only)", "awq", [["--to", "float16"]], False),
        # transformers 5.24 with compressed-tensors 0.20.1 expects weight_zero_point unpacked (N, G) and
        # refuses the packed (N/8, G) that compressed-tensors' own AutoAWQConverter writes (and packq too)
        ("AWQ -> compressed-tensors (transformers only)", "awq", [["--to", "compressed-tensors"]], False),
        ("AWQ -> GPTQ v1 for TGI (per field): not for these loaders", "awq", [["--for", "tgi"]], False),
        ("AWQ -> GPTQ v1 with no --for", "awq", [[]], False),
    ]
    report = {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__, "cases": []}
    for name, kind, steps, expected in cases:
        src = dst = work / f"gptqmodel-{kind}"
        for i, extra in enumerate(steps):
            prev, dst = dst, work / ("out-" + "-".join([kind, *[a.strip("-") for s in steps[: i + 1] for a in s]]))
            code, said = packq("convert", str(prev), str(dst), "--verify", "--force", *extra)
            if code:
                break
        commands = " then ".join(" ".join(["packq convert --verify", *extra]) for extra in steps)
        case = {"case": name, "packq": commands, "packq_exit": code,
                "packq_said": said.splitlines()[-1] if code else said.splitlines()[0], "expected_exact": expected}
        info = json.loads(subprocess.run([sys.executable, "-m", "packq", "inspect", str(src), "--json"],
                                         capture_output=True, text=True).stdout)
        case["zero_point_0_pairs"] = info["zero_point_0"]
        if code == 0:
            for loader in ("transformers",) if "transformers only" in name else ("transformers", "gptqmodel"):
                case[loader] = compare(src, dst, loader)
        report["cases"].append(case)
        print(json.dumps(case, indent=1), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
