"""The JAX example (examples/jax_llama.py, shown in docs/guide/jax.md) runs: a tiny Llama forward pass on weights
from packq.jax.load equals NumPy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("jax")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_jax_llama_logits_equal_the_numpy_reference():
    spec = importlib.util.spec_from_file_location("jax_llama", EXAMPLES / "jax_llama.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main() <= example.TOLERANCE


def test_import_packq_jax_is_the_loader():
    import packq.jax

    assert packq.jax.LAYOUTS == ("source", "gptq", "awq", "compressed-tensors", "int4", "dequantized")
