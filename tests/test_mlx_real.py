"""mlx-lm itself loads packq's MLX output: the committed results of scripts/mlx_loaders.py, checked here.

The run needs mlx-lm (Python >= 3.11, transformers >= 5.7) and GPTQModel-made sources, too heavy for CI:
it is opt-in (``pytest --real-loaders`` with PACKQ_MLX_PYTHON, an interpreter that has mlx-lm, and
PACKQ_MLX_WORK, a folder holding GPTQModel's gptqmodel-{awq,gptq,gptq_v2}). Its results are committed in
benchmarks/results/mlx_loaders.json; the first test checks what they say, and a corrupted copy must fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "mlx_loaders.json"


def check(report: dict) -> None:
    assert report["mlx"] == "0.32.4" and report["mlx_lm"].startswith("0.32")
    cases = report["cases"]
    assert set(cases) == {"awq", "gptq_v1", "gptq_v2", "compressed-tensors", "mixtral_gptq_v2"}
    for name, c in cases.items():
        exact, fast = c["mlx"], c["mlx-float16"]
        # the default: mlx-lm loads it, and every quantized layer's mx.dequantize is the source's weights, bit for bit
        assert exact["loaded"] and exact["packq_exit"] == 0 and exact["packq_verified"], name
        assert exact["quantized_layers"] == exact["layers_bit_equal"] == 14 and exact["weights_differing"] == 0, name
        assert exact["scales_dtypes"] == ["float32"] and exact["packq_differing"] == {"cpu": 0, "metal": 0}, name
        assert exact["argmax_identical"] and exact["logits_max_abs_diff"] <= report["tolerance"] * exact[
            "reference_max_abs_logit"], name
        # --mlx-scales float16: packq's count of what MLX's CPU computes differently is what MLX computed
        assert fast["loaded"] and fast["scales_dtypes"] == ["float16"], name
        assert fast["weights_differing"] == fast["packq_differing"]["cpu"] > 0, name
        assert fast["packq_differing"]["metal"] < fast["packq_differing"]["cpu"], name
    assert cases["mixtral_gptq_v2"]["mlx"]["how"] == "mlx_lm.utils.load_model"  # experts stacked by its sanitize
    assert cases["awq"]["mlx"]["how"] == "mlx_lm.load"  # with the tokenizer
    own = cases["awq"]["mlx_lm_own"]  # mlx-lm's own AWQ path: loads, but computes other weights
    assert own["loaded"] and own["weights_differing"] > own["weights"] // 4
    for name in ("gptq_v1", "gptq_v2", "mixtral_gptq_v2"):  # its GPTQ path refuses any g_idx
        assert not cases[name]["mlx_lm_own"]["loaded"] and "g_idx" in cases[name]["mlx_lm_own"]["error"], name
    assert not cases["compressed-tensors"]["mlx_lm_own"]["loaded"]


def test_committed_results_say_what_docs_mlx_says():
    check(json.loads(RESULTS.read_text()))


@pytest.mark.parametrize("corrupt", ["differing", "count", "argmax", "dtype"])
def test_a_corrupted_report_fails(corrupt):
    r = copy.deepcopy(json.loads(RESULTS.read_text()))
    case = r["cases"]["gptq_v1"]
    if corrupt == "differing":
        case["mlx"]["weights_differing"] = 1
    elif corrupt == "count":
        case["mlx-float16"]["packq_differing"]["cpu"] += 1
    elif corrupt == "argmax":
        case["mlx"]["argmax_identical"] = False
    else:
        case["mlx"]["scales_dtypes"] = ["float16"]
    with pytest.raises(AssertionError):
        check(r)


@pytest.mark.real_loaders
def test_mlx_loaders_now(tmp_path):
    python, work = os.environ.get("PACKQ_MLX_PYTHON"), os.environ.get("PACKQ_MLX_WORK")
    if not python or not work:
        pytest.skip("set PACKQ_MLX_PYTHON (an interpreter with mlx-lm) and PACKQ_MLX_WORK (GPTQModel's sources)")
    script = str(REPO / "scripts" / "mlx_loaders.py")
    subprocess.run([sys.executable, script, "convert", "--work", work], check=True)
    out = tmp_path / "mlx_loaders.json"
    subprocess.run([python, script, "load", "--work", work, "--out", str(out)], check=True)
    check(json.loads(out.read_text()))


def test_committed_encodings_say_what_docs_mlx_says():
    """scripts/mlx_encodings.py: which encodings MLX computes exactly, on its CPU (measured) and Metal (its arithmetic)."""
    r = json.loads((REPO / "benchmarks" / "results" / "mlx_encodings.json").read_text())
    assert r["mlx"] == "0.32.4"
    for kind, c in r["cases"].items():
        f = c["forms"]
        assert f["float32"]["cpu_differing"] == f["float32"]["metal_differing"] == 0, kind
        for name in ("float16", "5-bit", "8-bit"):  # the CPU rounds s * q in float16: never exact
            assert f[name]["cpu_differing"] > c["weights"] // 4, (kind, name)
        for name in ("5-bit", "8-bit"):  # bias -2**(b-1) * s is exact in float16: Metal is
            assert f[name]["metal_differing"] == 0, (kind, name)
    assert r["cases"]["symmetric"]["forms"]["float16"]["metal_differing"] == 0
    assert r["cases"]["asymmetric"]["forms"]["float16"]["metal_differing"] > 0
