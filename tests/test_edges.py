"""Edge cases of the array API: empty arrays, unsigned torch words, foreign dtypes, big-endian words.

Every backend gives the same result, and anything refused is a TypeError or
ValueError naming the argument: never a library's own error.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import packq
from conftest import Lib, assert_same

i32, f32 = np.int32, np.float32

# id: (function, arrays, keyword arguments, expected results (dtype, shape) ...)
EMPTY = {
    "unpack-0-rows": (packq.unpack, [np.zeros((0, 4), i32)], {}, [("int8", (0, 32))]),
    "unpack-0-columns": (packq.unpack, [np.zeros((4, 0), i32)], {}, [("int8", (4, 0))]),
    "unpack-row-0-rows": (packq.unpack, [np.zeros((0, 4), i32), "row"], {}, [("int8", (0, 4))]),
    "unpack-3bit-0-columns": (packq.unpack, [np.zeros((4, 0), i32)], {"bits": 3}, [("int8", (4, 0))]),
    "unpack-8bit-0-rows": (packq.unpack, [np.zeros((0, 2), i32)], {"bits": 8}, [("uint8", (0, 8))]),
    "pack-0-columns": (packq.pack, [np.zeros((4, 0), np.int8)], {}, [("int32", (4, 0))]),
    "pack-0-rows": (packq.pack, [np.zeros((0, 8), np.int8)], {}, [("int32", (0, 1))]),
    "pack-row-0-rows": (packq.pack, [np.zeros((0, 8), np.int8), "row"], {}, [("int32", (0, 8))]),
    "pack-8bit-0-columns": (packq.pack, [np.zeros((4, 0), np.int8)], {"bits": 8}, [("int32", (4, 0))]),
    "order-0-rows": (packq.apply_order, [np.zeros((0, 8), np.int8)], {}, [("int8", (0, 8))]),
    "awq-to-gptq-n-0": (packq.fast_awq_to_gptq, [np.zeros((128, 0), i32), np.zeros((1, 0), i32)], {},
                        [("int32", (16, 0)), ("int32", (1, 0))]),
    "awq-to-gptq-0-experts": (packq.fast_awq_to_gptq, [np.zeros((0, 128, 8), i32), np.zeros((0, 1, 8), i32)], {},
                              [("int32", (0, 16, 64)), ("int32", (0, 1, 8))]),
    "gptq-to-awq-n-0": (packq.gptq_to_awq, [np.zeros((16, 0), i32), np.zeros((1, 0), i32)], {},
                        [("int32", (128, 0)), ("int32", (1, 0))]),
    "dequantize-awq-n-0": (packq.dequantize_awq, [np.zeros((128, 0), i32), np.zeros((1, 0), i32), np.zeros((1, 0), f32)],
                           {}, [("float32", (128, 0))]),
    "dequantize-gptq-n-0": (packq.dequantize_gptq, [np.zeros((16, 0), i32), np.zeros((1, 0), i32), np.zeros((1, 0), f32)],
                            {}, [("float32", (128, 0))]),
    "zeros-v1-to-v2-0-rows": (packq.zeros_v1_to_v2, [np.zeros((0, 8), i32)], {}, [("int32", (0, 8))]),
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_inputs_give_empty_results_on_every_backend(lib: Lib, case):
    fn, args, kwargs, expected = EMPTY[case]
    args = [lib.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    out = lib.call(fn, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(expected)
    for got, (dtype, shape) in zip(outs, expected):
        assert_same(lib, got, np.zeros(shape, dtype))


def _words(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-(2**31), 2**31, shape).astype(i32)


def test_torch_unsigned_inputs_equal_signed():
    import torch

    qw, qz = _words((128, 4)), _words((1, 4), 1)
    as_u32 = lambda a: torch.from_numpy(a.copy()).view(torch.uint32)  # noqa: E731
    for got, want in zip(packq.fast_awq_to_gptq(as_u32(qw), as_u32(qz)), packq.fast_awq_to_gptq(qw, qz)):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(packq.unpack(as_u32(qw)).numpy(), packq.unpack(qw))
    values = np.random.default_rng(2).integers(0, 16, (8, 16))
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        np.testing.assert_array_equal(packq.pack(torch.from_numpy(values).to(dtype)).numpy(), packq.pack(values))
    with pytest.raises(ValueError, match=r"imatrix must hold values in \[-8, 15\] to pack without loss, got values in \[16, 16\]"):
        packq.pack(torch.full((1, 8), 16, dtype=torch.uint32))


def test_dtype_of_another_library_means_the_same_dtype():
    import jax.numpy as jnp
    import torch

    words = _words((4, 4))
    want = packq.unpack(words, dtype=np.int16)
    for x, dtype in [(torch.from_numpy(words), np.int16), (words, torch.int16), (jnp.asarray(words), np.int16),
                     (words, "int16"), (torch.from_numpy(words), "int16")]:
        got = packq.unpack(x, dtype=dtype)
        assert str(got.dtype).rsplit(".", 1)[-1] == "int16"
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(TypeError, match="^dtype must be an integer dtype that torch computes with, got int4$"):
        packq.unpack(torch.from_numpy(words), dtype=jnp.int4)
    with pytest.raises(TypeError, match="^dtype must be an integer dtype, got float32$"):
        packq.unpack(torch.from_numpy(words), dtype=np.float32)


def test_big_endian_words_equal_native():
    qw, qz = _words((128, 8)), _words((1, 8), 1)
    big = lambda a: a.astype(a.dtype.newbyteorder(">"))  # noqa: E731
    for got, want in zip(packq.fast_awq_to_gptq(big(qw), big(qz)), packq.fast_awq_to_gptq(qw, qz)):
        assert got.dtype == np.int32 and got.dtype.isnative
        np.testing.assert_array_equal(got, want)
    for got, want in zip(packq.gptq_to_awq(big(qw[:16]), big(qz[:, :1])), packq.gptq_to_awq(qw[:16], qz[:, :1])):
        np.testing.assert_array_equal(got, want)
    u = qw.view(np.uint32)
    np.testing.assert_array_equal(packq.unpack(big(u)), packq.unpack(u))
    np.testing.assert_array_equal(packq.unpack(big(qw), "row", bits=8), packq.unpack(qw, "row", bits=8))
    values = np.random.default_rng(3).integers(0, 16, (8, 16)).astype(np.int16)
    np.testing.assert_array_equal(packq.pack(big(values), "row"), packq.pack(values, "row"))
    scales = np.random.default_rng(4).random((1, 64)).astype(f32)
    got = packq.dequantize_awq(big(qw), big(qz), big(scales))
    assert got.tobytes() == packq.dequantize_awq(qw, qz, scales).astype(got.dtype).tobytes()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


CONVERT_THRICE = """
import numpy as np, packq
qw = np.random.default_rng(0).integers(0, 2**32, (4096, 64), dtype=np.uint64).astype(np.uint32).view(np.int32)
for _ in range(3):
    gw, gz = packq.fast_awq_to_gptq(qw, qw[:32])
    back, _ = packq.gptq_to_awq(gw, gz)
    assert (back == qw).all()
print("ok")
"""


def test_numba_without_a_writable_cache_falls_back_with_one_warning():
    pytest.importorskip("numba")
    # the locator numba uses for zip imports finds no place here: what a read-only install
    # run by a user whose HOME is not writable sees ("cannot cache function ...: no locator available")
    r = _python(CONVERT_THRICE, NUMBA_CACHE_LOCATOR_CLASSES="numba.core.caching.ZipCacheLocator", PACKQ_NUMBA="1")
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert r.stderr.count("RuntimeWarning: packq: numba cannot cache its kernels here") == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_thread_count_warns_once_and_runs(value):
    r = _python(CONVERT_THRICE, PACKQ_NUM_THREADS=value)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert r.stderr.count(f"PACKQ_NUM_THREADS must be a positive integer, got {value!r}") == 1, r.stderr
