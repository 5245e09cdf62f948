"""The torch backend: CPU tensors through the NumPy backend's compiled paths, CUDA through Triton.

Every public function on torch CPU tensors must equal the array-API core run eagerly on torch
itself, bit for bit, dtype and shape included: contiguous or not, batched (MoE) or not, int32 or
uint32 words. The Triton kernels are checked the same way here in Triton's interpreter (CPU
tensors, TRITON_INTERPRET=1), and on a GPU by scripts/gpu_torch_check.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packq
from packq.core import bits as B
from packq.formats import awq, gptq

torch = pytest.importorskip("torch")
xp = pytest.importorskip("array_api_compat.torch")

SHAPES = [(8, 8), (16, 24), (8, 5), (2, 16, 8), (3, 24, 7)]


@st.composite
def tensors(draw, shapes=SHAPES, layout=True):
    """int32 words as a torch tensor: contiguous, transposed in memory, or a strided view; int32 or uint32."""
    shape = draw(st.sampled_from(shapes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = torch.from_numpy(rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32))
    how = draw(st.sampled_from(["contiguous", "transposed", "strided"])) if layout else "contiguous"
    if how == "transposed":  # same values, column-major storage
        a = a.mT.contiguous().mT
    elif how == "strided":  # every other column of a wider tensor
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=torch.int32)
        wide[..., ::2] = a
        a = wide[..., ::2]
    return a


def _same(got, want) -> None:
    assert type(got) is type(want) and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def _core(fn, *arrays, **static):
    return fn(xp, *arrays, **static)


def test_torch_tensors_get_the_torch_backend():
    from packq import backends

    assert backends.for_arrays(x=torch.zeros(1)).name == "torch"


@given(qw=tensors(), uint=st.booleans())
def test_awq_gptq_round_trip_equals_the_core(qw, uint):
    zeros = qw[..., : qw.shape[-2] // 8 or 1, :]
    words = qw.view(torch.uint32) if uint else qw
    before = qw.clone()
    got_w, got_z = packq.fast_awq_to_gptq(words, zeros.view(torch.uint32) if uint else zeros)
    _same(got_w, _core(awq.weight_to_gptq, qw))
    _same(got_z, _core(awq.zeros_to_gptq, zeros))
    assert torch.equal(qw, before)  # the input is read in place (shared with NumPy), never written
    back_w, back_z = packq.gptq_to_awq(got_w, got_z)
    _same(back_w, qw.contiguous())
    _same(back_z, zeros.contiguous())


@given(w=tensors([(24, 6), (2, 48, 12), (96, 3)]), bits=st.sampled_from([2, 3, 4, 8]),
       direction=st.sampled_from(["column", "row"]),
       dtype=st.sampled_from([None, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]))
def test_unpack_pack_equal_the_core(w, bits, direction, dtype):
    if dtype is not None and dtype.itemsize == 1 and bits == 8 and dtype == torch.int8:
        dtype = torch.int16  # int8 holds 0..255 only as int8-wrapped, asked for by name elsewhere
    got = packq.unpack(w, direction, bits=bits, dtype=dtype)
    out_dtype = dtype if dtype is not None else (torch.int8 if bits < 8 else torch.uint8)
    _same(got, _core(B.unpack_as, w, direction=direction, bits=bits, dtype=out_dtype, wrap=False))
    _same(packq.pack(got, direction, bits=bits), _core(B.pack, got, direction=direction, bits=bits))


@given(z=tensors([(4, 6), (2, 3, 12), (1, 24)]), bits=st.sampled_from([2, 3, 4, 8]),
       convention=st.sampled_from(["field", "word"]))
def test_zero_storage_equals_the_core(z, bits, convention):
    if convention == "word" and bits == 3:
        convention = "field"  # GPTQModel shifts 3-bit fields one by one
    fn = gptq.zeros_word_add if convention == "word" else gptq.zeros_shift
    _same(packq.zeros_v1_to_v2(z, bits=bits, convention=convention), _core(fn, z, delta=1, bits=bits))
    _same(packq.zeros_v2_to_v1(z, bits=bits, convention=convention), _core(fn, z, delta=-1, bits=bits))


@given(qw=tensors([(16, 2), (2, 32, 1)], layout=False), dtype=st.sampled_from([torch.float16, torch.float32,
                                                                                  torch.bfloat16]))
def test_dequantize_equals_the_core(qw, dtype):
    *lead, k, c = qw.shape
    zeros = qw[..., :2, :].contiguous()
    scales = torch.linspace(-2, 2, 2 * c * 8).reshape(2, c * 8).to(dtype).expand(*lead, 2, c * 8).contiguous()
    _same(packq.dequantize_awq(qw, zeros, scales), _core(gptq.dequantize_awq, qw, zeros, scales))
    g = _core(awq.weight_to_gptq, qw)
    _same(packq.dequantize_gptq(g, zeros, scales, bits=4),
          _core(gptq.dequantize_gptq, g, zeros, scales, None, bits=4, zeros="v1"))


def test_results_never_alias_the_inputs():
    """A result from the NumPy paths is new memory even where the core could return a view."""
    qw = torch.arange(64 * 8, dtype=torch.int32).reshape(64, 8)
    ct = packq.gptq_to_compressed_tensors(qw, qw[:8, :1], qw[:8].float())
    for out in (*packq.fast_awq_to_gptq(qw, qw[:8]), *ct):
        assert out.untyped_storage().data_ptr() != qw.untyped_storage().data_ptr()


def test_cpu_calls_take_the_numpy_paths(monkeypatch):
    """torch CPU tensors reach the NumPy backend's compiled paths, not the eager core."""
    from packq.backends import numpy as numpy_backend

    calls = []
    real = numpy_backend.weight_to_gptq
    monkeypatch.setitem(numpy_backend.NumpyBackend.fast_paths, awq.weight_to_gptq,
                        lambda *a: calls.append("numpy") or real(*a))
    packq.fast_awq_to_gptq(torch.zeros((8, 8), dtype=torch.int32), torch.zeros((1, 8), dtype=torch.int32))
    assert calls == ["numpy"]


# ---------------------------------------------------------------- the Triton kernels, interpreted
def test_triton_kernels_in_the_interpreter():
    """tests/triton_interpreted in its own process: Triton must be imported with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    here = Path(__file__).parent
    args = ["--thorough"] if settings().max_examples > 100 else []
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args,
                        str(here / "triton_interpreted")], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, cwd=here.parent)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
