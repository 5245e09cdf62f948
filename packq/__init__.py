"""packq: packed integer formats of quantized LLM weights, exact and framework-neutral.

Pack, unpack and reorder 2-, 3-, 4- and 8-bit values in 32-bit words; convert
AWQ to the GPTQ/ExLlama layout and back, bit-exactly; dequantize; convert whole
checkpoints on disk (``packq convert``). One core, written against the Python
array API standard, runs on NumPy, on JAX under ``jax.jit``, and on torch.

``import packq`` imports neither JAX nor torch: a backend's library is imported
only when an array of that library arrives.
"""

from __future__ import annotations

from typing import Any

# The public functions are imported on first use (PEP 562), not here: ``packq.cli`` then starts with the
# standard library only, installs its signal handlers, and only then imports NumPy and the rest, so that
# Ctrl-C or SIGTERM during those imports ends it in one line, not a traceback.
_API = (
    "AWQ_PACK_ORDER",
    "REVERSE_AWQ_PACK_ORDER",
    "apply_order",
    "awq_to_mlx",
    "compressed_tensors_to_gptq",
    "compressed_tensors_to_mlx",
    "dequantize_awq",
    "dequantize_gptq",
    "dequantize_mlx",
    "fast_awq_to_gptq",
    "gptq_to_awq",
    "gptq_to_compressed_tensors",
    "gptq_to_mlx",
    "mlx_to_gptq",
    "pack",
    "unpack",
    "zeros_v1_to_v2",
    "zeros_v2_to_v1",
)


def __getattr__(name: str) -> Any:
    if name in _API:
        from packq import _api

        for public in _API:  # every one at once, then plain module attributes: no lookup cost after the first
            globals()[public] = getattr(_api, public)
        return globals()[name]
    raise AttributeError(f"module 'packq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


__version__ = "0.1.0"

__all__ = list(_API)  # (checked against packq._api.__all__ by tests/test_layout.py)
