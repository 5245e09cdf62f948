"""Real third-party loaders: GPTQModel and transformers load packq's conversions exactly.

The run itself (scripts/real_loaders.py) needs gptqmodel and transformers, too heavy for CI: it is
opt-in (``pytest --real-loaders``, in an environment that has them). The results of the last run are
committed in benchmarks/results/real_loaders.json; the first test checks what they say, so that the
evidence in the repository cannot silently stop meaning what the documentation claims (docs/engines.md).
"""

from __future__ import annotations

import importlib.util
import json
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
