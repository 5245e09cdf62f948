"""Upstream exllamav2 loads packq's GPTQ checkpoints through its own model loader; logits vs a float reference.

Two steps, because the reference needs transformers and the loader needs a GPU:

    # here (CPU; transformers installed): checkpoints and float32 reference logits
    python scripts/gpu_exllama_loader.py prepare gpu_inputs --awq AWQ_DIR
    # on the GPU machine (exllamav2 0.3.2 importable): load each, run a forward pass, compare
    python scripts/gpu_exllama_loader.py run gpu_inputs --out result.json

``prepare`` takes an AWQ checkpoint with zero-points of 0 whose pairs hold a 15 (what min-max
quantization makes: scripts/real_loaders.py writes one with GPTQModel), makes a variant whose zero-0
pairs hold values <= 14, and converts:

  exl2-rebiased   the variant, ``--for exllamav2``: every zero-0 pair rebiased (exact)
  exl2-inexact    the original, ``--for exllamav2 --allow-inexact`` (packq refuses without the flag)
  v1-per-field    the original, ``--for tgi``: per-field v1, what TGI reads exactly, not exllamav2

The reference is a float32 transformers forward pass with every quantized linear replaced by the
dequantized AWQ source weights (packq.dequantize_awq, itself checked against independent code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

IDS = [[1, 5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12, 13, 14, 15, 16]]
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
CASES = {"exl2-rebiased": "fixable", "exl2-inexact": "original", "v1-per-field": "original"}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _copy(src: Path, dst: Path, clamp: bool) -> None:
    """A copy of the AWQ checkpoint with float16 scales (exllamav2 takes float16; GPTQModel wrote bfloat16,
    which float16 holds exactly at these magnitudes), and with ``clamp``, every zero-0 (group, column)
    pair holding values <= 14 only."""
    import torch
    from safetensors.torch import load_file, save_file

    import packq

    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        t = load_file(str(f))
        for name in [k for k in t if k.endswith(".scales")]:
            half = t[name].to(torch.float16)
            assert torch.equal(half.to(t[name].dtype), t[name]), "float16 does not hold these scales exactly"
            t[name] = half
        for name in [k for k in t if k.endswith(".qweight") and clamp]:
            prefix = name[: -len(".qweight")]
            q = packq.unpack(t[name].numpy())
            q = packq.apply_order(q, order=packq.REVERSE_AWQ_PACK_ORDER).astype(np.int16)
            z = packq.apply_order(packq.unpack(t[f"{prefix}.qzeros"].numpy()), order=packq.REVERSE_AWQ_PACK_ORDER)
            g = q.shape[0] // z.shape[0]
            zero0 = np.repeat(z == 0, g, axis=0)
            q = np.where(zero0, np.minimum(q, 14), q)
            t[name] = torch.from_numpy(packq.pack(packq.apply_order(q, order=packq.AWQ_PACK_ORDER)))
        save_file(t, str(f), metadata={"format": "pt"})


def _reference(awq: Path, save_float16: Path | None = None) -> np.ndarray:
    """float32 logits with the dequantized AWQ weights in a plain transformers Llama.

    With ``save_float16``, that model is also saved there in float16: a plain checkpoint that
    tells whether the loader computes the model itself as transformers does, quantization aside.
    """
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    import packq

    config = AutoConfig.from_pretrained(str(awq))
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config).float()
    t = _tensors(awq)
    state = {}
    for name, v in t.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            w = packq.dequantize_awq(v.numpy(), t[f"{prefix}.qzeros"].numpy(), t[f"{prefix}.scales"].numpy())
            state[f"{prefix}.weight"] = torch.from_numpy(w.astype(np.float32)).T.contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            state[name] = v.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS)).logits.float().numpy()
    if save_float16 is not None:
        model.half().save_pretrained(str(save_float16))
    return logits


def prepare(out: Path, awq: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sources = {"original": out / "awq-original", "fixable": out / "awq-fixable"}
    for source, path in sources.items():
        if not path.exists():
            _copy(awq, path, clamp=source == "fixable")
    args = {"exl2-rebiased": ["--for", "exllamav2"], "exl2-inexact": ["--for", "exllamav2", "--allow-inexact"],
            "v1-per-field": ["--for", "tgi"]}
    said = {}
    for case, source in CASES.items():
        if case not in args:
            continue
        r = subprocess.run([sys.executable, "-m", "packq", "convert", str(sources[source]), str(out / case), "--verify",
                            "--force", "--json", *args[case]], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        said[case] = {k: s[k] for k in ("checkpoint_format", "for", "rebiased", "inexact_pairs", "max_weight_error")}
    r = subprocess.run([sys.executable, "-m", "packq", "convert", str(sources["original"]), str(out / "refused"),
                        "--for", "exllamav2"],
                       capture_output=True, text=True)
    said["refused without --allow-inexact"] = {"exit": r.returncode, "stderr": r.stderr.strip()}
    refs = {source: _reference(path, out / f"float16-{source}") for source, path in sources.items()}
    np.savez(out / "reference.npz", ids=np.array(IDS), **refs)
    (out / "packq.json").write_text(json.dumps(said, indent=1) + "\n")
    print(json.dumps(said, indent=1))


def _exllama_logits(folder: Path, ids) -> np.ndarray:
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = ExLlamaV2Config(str(folder))
    config.prepare()
    config.max_seq_len = 128
    model = ExLlamaV2(config)
    model.load()
    with torch.no_grad():
        logits = model.forward(ids).float().cpu().numpy()
    model.unload()
    return logits


def _compare(logits: np.ndarray, ref: np.ndarray) -> dict:
    logits = logits[..., : ref.shape[-1]]  # exllamav2 pads the vocabulary to a multiple of 32
    return {"relative_error": float(np.abs(logits - ref).max() / np.abs(ref).max()),
            "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean())}


def run(inputs: Path, out: Path | None) -> int:
    """Each GPTQ checkpoint against the same model in exllamav2 with the dequantized source weights in float16.

    The float16 checkpoints are the float reference computed from the dequantized source weights,
    run by exllamav2 itself, so that only the quantized path differs; the transformers float32
    logits are reported beside them.
    """
    import torch

    refs = np.load(inputs / "reference.npz")
    ids = torch.tensor(refs["ids"])
    results = {"exllamav2": __import__("exllamav2").__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0), "packq": json.loads((inputs / "packq.json").read_text())}
    floats = {source: _exllama_logits(inputs / f"float16-{source}", ids) for source in ("fixable", "original")}
    for source, logits in floats.items():
        results[f"float16-{source} vs transformers float32"] = r = _compare(logits, refs[source])
        print(f"exllamav2 float16 ({source}) vs transformers float32: {r}", flush=True)
    for case, source in CASES.items():
        results[case] = r = {**_compare(_exllama_logits(inputs / case, ids), floats[source][..., : refs[source].shape[-1]]),
                             "reference": f"float16-{source}"}
        print(f"{case:<14} vs exllamav2 float16 of the dequantized {source} AWQ: {r}", flush=True)
    if out:
        out.write_text(json.dumps(results, indent=1) + "\n")
    exact, worst_other = results["exl2-rebiased"]["relative_error"], min(
        results["exl2-inexact"]["relative_error"], results["v1-per-field"]["relative_error"])
    print(f"rebiased: {exact:.3e}; inexact encodings: >= {worst_other:.3e} ({worst_other / max(exact, 1e-30):.0f}x)")
    return 0 if exact < 5e-3 and worst_other > 5 * exact else 1


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--awq", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("inputs", type=Path)
    r.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.out, a.awq)
    else:
        sys.exit(run(a.inputs, a.out))


if __name__ == "__main__":
    main()
