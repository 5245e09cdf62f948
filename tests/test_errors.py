"""Bad input: the same clear TypeError/ValueError on every backend, raised before any work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import packq
from conftest import BACKENDS, Lib

i32 = np.int32
W8 = np.zeros((8, 8), i32)  # a valid 8x8 word matrix
Z1 = np.zeros((1, 8), i32)
S = np.zeros((1, 64), np.float32)
GZ = np.zeros((1, 1), i32)  # GPTQ qzeros of an 8x8 GPTQ qweight (K=64, N=8, one group)
GS = np.zeros((1, 8), np.float32)

# id: (function, arguments made by the backend, keyword arguments, exception, exact message)
CASES = {
    "pack-float": (packq.pack, lambda L: (L.asarray(np.zeros((8, 8), np.float32)),), {}, TypeError,
                   "imatrix must have an integer dtype, got dtype float32"),
    "pack-1d": (packq.pack, lambda L: (L.asarray(np.zeros(8, np.int8)),), {}, ValueError,
                "imatrix must have at least 2 dimensions (..., rows, columns), got shape (8,)"),
    "pack-axis": (packq.pack, lambda L: (L.asarray(np.zeros((8, 12), np.int8)),), {}, ValueError,
                  "imatrix must have a number of columns that is a multiple of 8 (8 4-bit values fill a word), "
                  "got shape (8, 12)"),
    "pack-row-axis": (packq.pack, lambda L: (L.asarray(np.zeros((12, 8), np.int8)), "row"), {}, ValueError,
                      "imatrix must have a number of rows that is a multiple of 8 (8 4-bit values fill a word), "
                      "got shape (12, 8)"),
    "pack-direction": (packq.pack, lambda L: (L.asarray(np.zeros((8, 8), np.int8)), "diagonal"), {}, ValueError,
                       "direction must be 'column' or 'row', got 'diagonal'"),
    "pack-bits": (packq.pack, lambda L: (L.asarray(np.zeros((8, 8), np.int8)),), {"bits": 5}, ValueError,
                  "bits must be one of 2, 3, 4, 8, got 5"),
    "pack-not-array": (packq.pack, lambda L: ([[1, 2]],), {}, TypeError,
                       "imatrix must be an array (NumPy, JAX, torch or another array API library), got list"),
    "unpack-float": (packq.unpack, lambda L: (L.asarray(np.zeros((8, 8), np.float32)),), {}, TypeError,
                     "qmatrix must hold packed 32-bit words (dtype int32 or uint32), got dtype float32"),
    "unpack-int16": (packq.unpack, lambda L: (L.asarray(np.zeros((8, 8), np.int16)),), {}, TypeError,
                     "qmatrix must hold packed 32-bit words (dtype int32 or uint32), got dtype int16"),
    "unpack-1d": (packq.unpack, lambda L: (L.asarray(np.zeros(8, i32)),), {}, ValueError,
                  "qmatrix must have at least 2 dimensions (..., rows, columns), got shape (8,)"),
    "unpack-direction": (packq.unpack, lambda L: (L.asarray(W8), "up"), {}, ValueError,
                         "direction must be 'column' or 'row', got 'up'"),
    "unpack-3bit-axis": (packq.unpack, lambda L: (L.asarray(np.zeros((8, 4), i32)),), {"bits": 3}, ValueError,
                         "qmatrix must have a number of columns that is a multiple of 3 (32 3-bit values fill "
                         "3 words), got shape (8, 4)"),
    "order-not-perm": (packq.apply_order, lambda L: (L.asarray(W8), "column", [0, 1, 2, 3, 4, 5, 6, 6]), {},
                       ValueError, "order must be a permutation of range(8), got [0, 1, 2, 3, 4, 5, 6, 6]"),
    "order-short": (packq.apply_order, lambda L: (L.asarray(W8), "column", [1, 0]), {}, ValueError,
                    "order must be a permutation of range(8), got [1, 0]"),
    "order-direction": (packq.apply_order, lambda L: (L.asarray(W8), "sideways"), {}, ValueError,
                        "direction must be 'column' or 'row', got 'sideways'"),
    "order-axis": (packq.apply_order, lambda L: (L.asarray(np.zeros((12, 8), i32)), "row"), {}, ValueError,
                   "imatrix must have a number of rows that is a multiple of 8 (the order applies to groups of 8), "
                   "got shape (12, 8)"),
    "order-1d": (packq.apply_order, lambda L: (L.asarray(np.zeros(8, i32)),), {}, ValueError,
                 "imatrix must have at least 2 dimensions (..., rows, columns), got shape (8,)"),
    "awq-float": (packq.fast_awq_to_gptq, lambda L: (L.asarray(W8.astype(np.float32)), L.asarray(Z1)), {},
                  TypeError, "qweight must hold packed 32-bit words (dtype int32 or uint32), got dtype float32"),
    "awq-zeros-int16": (packq.fast_awq_to_gptq, lambda L: (L.asarray(W8), L.asarray(Z1.astype(np.int16))), {},
                        TypeError, "qzeros must hold packed 32-bit words (dtype int32 or uint32), got dtype int16"),
    "awq-columns": (packq.fast_awq_to_gptq, lambda L: (L.asarray(W8), L.asarray(np.zeros((1, 4), i32))), {},
                    ValueError, "qweight and qzeros must have the same number of columns (N/8 packed words), "
                    "got shapes (8, 8) and (1, 4)"),
    "awq-rows": (packq.fast_awq_to_gptq, lambda L: (L.asarray(np.zeros((12, 8), i32)), L.asarray(Z1)), {},
                 ValueError, "qweight must have a number of rows that is a multiple of 8 (GPTQ packs 8 rows into "
                 "a word), got shape (12, 8)"),
    "awq-1d": (packq.fast_awq_to_gptq, lambda L: (L.asarray(np.zeros(8, i32)), L.asarray(Z1)), {}, ValueError,
               "qweight must have at least 2 dimensions (..., rows, columns), got shape (8,)"),
    "awq-groups": (packq.fast_awq_to_gptq, lambda L: (L.asarray(np.zeros((16, 8), i32)),
                                                      L.asarray(np.zeros((3, 8), i32))), {}, ValueError,
                   "qzeros must have one row per quantization group, a divisor of qweight's 16 rows, "
                   "got shape (3, 8)"),
    "awq-batch": (packq.fast_awq_to_gptq, lambda L: (L.asarray(np.zeros((2, 8, 8), i32)), L.asarray(Z1)), {},
                  ValueError, "qweight and qzeros must have the same leading (batch) dimensions, "
                  "got shapes (2, 8, 8) and (1, 8)"),
    "gptq-act-order-g_idx-length": (packq.gptq_to_awq, lambda L: (L.asarray(W8), L.asarray(GZ),
                                                                   L.asarray(np.zeros(7, i32))), {}, ValueError,
                                    "g_idx must have shape (64,), one group index per input feature, got shape (7,)"),
    "dequant-scales-shape": (packq.dequantize_awq, lambda L: (L.asarray(np.zeros((64, 8), i32)), L.asarray(Z1),
                                                              L.asarray(np.zeros((2, 64), np.float32))), {},
                             ValueError, "scales must have shape (1, 64) (one row per group of qweight, one column "
                             "per output feature), got shape (2, 64)"),
    "dequant-scales-int": (packq.dequantize_awq, lambda L: (L.asarray(np.zeros((64, 8), i32)), L.asarray(Z1),
                                                            L.asarray(np.zeros((1, 64), i32))), {}, TypeError,
                           "scales must have a floating dtype (float16, bfloat16 or float32), got dtype int32"),
    "dequant-gptq-zeros": (packq.dequantize_gptq, lambda L: (L.asarray(W8), L.asarray(GZ), L.asarray(GS)),
                           {"zeros": "v3"}, ValueError,
                           "zeros must be 'v1' (checkpoint_format gptq) or 'v2' (gptq_v2), got 'v3'"),
    "dequant-gptq-bits": (packq.dequantize_gptq, lambda L: (L.asarray(W8), L.asarray(GZ), L.asarray(GS)),
                          {"bits": 6}, ValueError, "bits must be one of 2, 3, 4, 8, got 6"),
    "gptq-zeros-columns": (packq.dequantize_gptq, lambda L: (L.asarray(W8), L.asarray(Z1), L.asarray(GS)), {},
                           ValueError, "qzeros must have 1 columns (4-bit zeros of qweight's 8 columns), got shape (1, 8)"),
    "gptq-scales-shape": (packq.dequantize_gptq, lambda L: (L.asarray(W8), L.asarray(GZ), L.asarray(S)), {},
                          ValueError, "scales must have shape (1, 8) (one row per group of qweight, one column per "
                          "output feature), got shape (1, 64)"),
    "gptq-g_idx-float": (packq.dequantize_gptq, lambda L: (L.asarray(W8), L.asarray(GZ), L.asarray(GS),
                                                           L.asarray(np.zeros(64, np.float32))), {}, TypeError,
                         "g_idx must have an integer dtype, got dtype float32"),
    "gptq-awq-bits": (packq.gptq_to_awq, lambda L: (L.asarray(np.zeros((8, 12), i32)), L.asarray(GZ)), {},
                      ValueError, "qweight must have a number of columns that is a multiple of 8 (qzeros packs 8 "
                      "4-bit values fill a word along columns), got shape (8, 12)"),
    "awq-bits": (packq.fast_awq_to_gptq, lambda L: (L.asarray(W8), L.asarray(Z1)), {"bits": 3}, ValueError,
                 "bits must be one of 4 (AWQ and its interleave are 4-bit only), got 3"),
    "gptq-to-awq-bits": (packq.gptq_to_awq, lambda L: (L.asarray(W8), L.asarray(GZ)), {"bits": 8}, ValueError,
                         "bits must be one of 4 (AWQ and its interleave are 4-bit only), got 8"),
    "order-bits": (packq.apply_order, lambda L: (L.asarray(W8),), {"bits": 2}, ValueError,
                   "bits must be one of 4 (AWQ and its interleave are 4-bit only), got 2"),
    "dequant-awq-bits": (packq.dequantize_awq, lambda L: (L.asarray(np.zeros((64, 8), i32)), L.asarray(Z1),
                                                          L.asarray(S)), {"bits": 2}, ValueError,
                         "bits must be one of 4 (AWQ and its interleave are 4-bit only), got 2"),
    "zeros-bits": (packq.zeros_v1_to_v2, lambda L: (L.asarray(Z1),), {"bits": 1}, ValueError,
                   "bits must be one of 2, 3, 4, 8, got 1"),
    "ct-scales-shape": (packq.gptq_to_compressed_tensors, lambda L: (L.asarray(np.zeros((8, 8), i32)),
                        L.asarray(GZ), L.asarray(np.zeros((1, 4), np.float32))), {}, ValueError,
                        "scales must have shape (1, 8) (one row per group of qweight, one column per output feature), "
                        "got shape (1, 4)"),
    "ct-zero-point-shape": (packq.compressed_tensors_to_gptq, lambda L: (L.asarray(np.zeros((8, 8), i32)),
                            L.asarray(np.zeros((2, 1), i32)), L.asarray(np.zeros((8, 1), np.float32))), {}, ValueError,
                            "weight_zero_point must have shape (..., 1, 1), got shape (2, 1)"),
    "ct-scale-float": (packq.compressed_tensors_to_gptq, lambda L: (L.asarray(np.zeros((8, 8), i32)),
                       L.asarray(np.zeros((1, 1), i32)), L.asarray(np.zeros((8, 1), i32))), {}, TypeError,
                       "weight_scale must have a floating dtype (float16, bfloat16 or float32), got dtype int32"),
    "ct-packed-words": (packq.compressed_tensors_to_gptq, lambda L: (L.asarray(np.zeros((8, 8), np.float32)),
                        L.asarray(np.zeros((1, 1), i32)), L.asarray(np.zeros((8, 1), np.float32))), {}, TypeError,
                        "weight_packed must hold packed 32-bit words (dtype int32 or uint32), got dtype float32"),
    "zeros-convention": (packq.zeros_v2_to_v1, lambda L: (L.asarray(Z1),), {"convention": "carry"}, ValueError,
                         "convention must be 'field' or 'word', got 'carry'"),
    "zeros-word-3bit": (packq.zeros_v1_to_v2, lambda L: (L.asarray(np.zeros((1, 3), i32)),),
                        {"bits": 3, "convention": "word"}, ValueError,
                        "convention 'word' is a whole-word add at 2, 4 and 8 bits; 3-bit fields straddle words and "
                        "every engine shifts them field by field: use convention 'field', got bits=3"),
}

# value checks need concrete arrays: every backend but a tracer
VALUE_CASES = {
    "pack-range": (packq.pack, lambda L: (L.asarray(np.full((1, 8), 16, np.int16)),), {}, ValueError,
                   "imatrix must hold values in [-8, 15] to pack without loss, got values in [16, 16]"),
    "pack-range-negative": (packq.pack, lambda L: (L.asarray(np.full((1, 16), -3, np.int16)),), {"bits": 2},
                            ValueError, "imatrix must hold values in [-2, 3] to pack without loss, got values in "
                            "[-3, -3]"),
    "g_idx-range": (packq.dequantize_gptq, lambda L: (L.asarray(W8), L.asarray(GZ), L.asarray(GS),
                                                      L.asarray(np.full(64, 1, i32))), {}, ValueError,
                    "g_idx must hold values in [0, 0] (indices of the 1 groups of qzeros), got values in [1, 1]"),
    "act-order-to-awq": (packq.gptq_to_awq, lambda L: (L.asarray(np.zeros((2, 8), i32)), L.asarray(np.zeros((2, 1), i32)),
                                                       L.asarray(np.array([0, 1] * 8, i32))), {}, ValueError,
                         "g_idx must be arange(K) // group_size to convert to AWQ; this one is act-order (desc_act), "
                         "whose input features would have to be permuted, which AWQ cannot express"),
}


def _run(cases, case, backends):
    fn, make, kwargs, exc, message = cases[case]
    for name in backends:
        lib = Lib(name)
        with pytest.raises(exc) as info:
            lib.call(fn, *make(lib), **kwargs)
        assert str(info.value) == message, f"{name}: {info.value}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_same_error_everywhere(case):
    _run(CASES, case, BACKENDS)


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_bad_values_same_error_on_eager_backends(case):
    _run(VALUE_CASES, case, [b for b in BACKENDS if b != "jax-traced"])


def test_mixed_libraries_are_refused():
    import jax.numpy as jnp

    with pytest.raises(TypeError, match=re.escape("qweight and qzeros must come from the same array library")):
        packq.fast_awq_to_gptq(W8, jnp.asarray(Z1))


def test_errors_come_before_work(monkeypatch):
    """A bad argument never reaches a backend."""
    import packq.backends as backends

    def boom(**_):
        raise AssertionError("a backend was reached")

    monkeypatch.setattr(backends, "for_arrays", boom)
    for fn, make, kwargs, exc, _ in CASES.values():
        with pytest.raises(exc):
            fn(*make(Lib("numpy")), **kwargs)


def test_import_packq_imports_no_framework():
    """Neither framework, nor numba (0.2 s and 100 MB to import), nor array-api-compat (0.1-0.4 s: its NumPy
    namespace imports numpy.testing and f2py), until a call needs it."""
    code = ("import sys, packq, packq.cli, packq.checkpoint; "
            "bad = {'jax', 'torch', 'numba', 'huggingface_hub', 'array_api_compat'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


_BLAS_CHILD = ("import os, sys; sys.argv = ['packq', 'convert', {src!r}, {dst!r}, '--for', 'tgi']; "
               "from packq.cli import main; rc = main() if {program} else main(sys.argv[1:]); assert rc == 0, rc; "
               "print(os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')))")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts the process's threads in /proc; OpenBLAS starts none on one core")
@pytest.mark.parametrize("program, given, expected", [(True, None, "1"), (True, "2", "2"), (False, None, "None")])
def test_the_program_starts_no_blas_threads(tmp_path, program, given, expected):
    """``packq`` itself (main() reading sys.argv) loads NumPy with OpenBLAS on one thread, so its import starts no
    pool that no packq command uses; a count the user set is kept, and a caller's own process (``main(argv)``) keeps
    its environment. After the conversion, the pools packq started are gone: threads left are OpenBLAS's."""
    example = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    code = _BLAS_CHILD.format(src=str(example), dst=str(tmp_path / "out"), program=program)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    value, threads = out.split()[-2:]
    assert value == expected
    assert (int(threads) == 1) == (expected == "1"), f"{threads} threads with OPENBLAS_NUM_THREADS={value}"


def test_every_package_is_installed():
    """pyproject's package list names every folder of packq, so a wheel (not only -e) holds all of it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "packq").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"


# ------------------------------------------------------------------ issue 19, item 17: errors that name the argument
@pytest.mark.parametrize("dtype, message", [
    ("int99", "dtype must be an integer dtype of 2, 4, 8, 16, 32 or 64 bits, got int99"),
    (bool, "dtype must be an integer dtype, got bool"),
    (np.bool_, "dtype must be an integer dtype, got bool"),
    (int, "dtype must be an integer dtype, got int"),
    ("float32", "dtype must be an integer dtype, got float32"),
])
def test_unpack_dtype_errors_name_it(dtype, message):
    for name in [b for b in BACKENDS if b != "jax-traced"]:
        lib = Lib(name)
        with pytest.raises(TypeError) as info:
            lib.call(packq.unpack, lib.asarray(W8), dtype=dtype)
        assert str(info.value) == message, f"{name}: {info.value}"


def test_sparse_torch_tensor_is_refused_by_name():
    torch = pytest.importorskip("torch")
    sparse = torch.zeros((8, 8), dtype=torch.int32).to_sparse()
    with pytest.raises(TypeError, match=r"^qmatrix must be a dense array \(a strided torch tensor\), got layout "
                                        r"torch.sparse_coo; call .to_dense\(\) first$"):
        packq.unpack(sparse)
    with pytest.raises(TypeError, match="^imatrix must be a dense array"):
        packq.pack(torch.zeros((8, 8), dtype=torch.int8).to_sparse())


def test_jax_inputs_on_two_devices_are_refused_by_name():
    """Committed JAX arrays on different devices: a ValueError naming both, not an XLA internal error."""
    code = """
import jax, jax.numpy as jnp, packq
a, b = jax.devices()[:2]
q = jax.device_put(jnp.zeros((128, 8), jnp.int32), a)
z = jax.device_put(jnp.zeros((1, 8), jnp.int32), b)
try:
    packq.fast_awq_to_gptq(q, z)
except ValueError as e:
    assert str(e) == f"qweight and qzeros must be on the same device(s), got qweight on {a}, qzeros on {b}", str(e)
    print("refused:", e)
else:
    raise SystemExit("not refused")
w, _ = packq.fast_awq_to_gptq(q, jax.device_put(z, a))  # the same device: converts
assert w.devices() == {a}
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "refused: qweight and qzeros" in r.stdout, r.stdout + r.stderr


def test_a_layout_attribute_refuses_only_torch_tensors():
    """The sparse-layout check is torch's: JAX 0.11's tracers carry a ``layout`` (AutoLayout inside jit), and
    refusing them broke every conversion traced under jit (packq.jax.load on an H200, 2026-12-01)."""
    from packq import _validate as V

    class WithLayout(np.ndarray):
        layout = "AutoLayout"

    V.array(np.zeros((2, 2)).view(WithLayout), "qweight")  # no error
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="qweight must be a dense array"):
        V.array(torch.zeros((2, 2)).to_sparse(), "qweight")
