"""On a CUDA machine: packq's torch CUDA path (Triton) and JAX GPU path, bit for bit against NumPy.

Random words in many shapes (single layers, stacked MoE experts, ragged tiles), int32 and uint32,
contiguous and not, through the public calls on CUDA tensors and on JAX GPU arrays; every result
must equal packq on NumPy (itself checked against the golden fixtures). Prints one JSON object;
exit status 1 on any difference.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import packq
from packq.backends import torch as torch_backend

SHAPES = [(8, 8), (128, 16), (4096, 512), (11008, 512), (8, 64, 40), (16, 256, 96), (32, 8), (1024, 3)]


def main() -> int:
    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    assert torch_backend.triton_kernels() is not None, "Triton is not importable: the CUDA path would be the core"
    import jax

    gpu = jax.devices("gpu")[0]
    checked, failures = 0, []
    for shape in SHAPES:
        for group in (1, 8):
            qw = rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32)
            qz = rng.integers(-(2**31), 2**31, (*shape[:-2], max(1, shape[-2] // (8 * group)), shape[-1]),
                              dtype=np.int64).astype(np.int32)
            want_w, want_z = packq.fast_awq_to_gptq(qw, qz)
            back_w, back_z = packq.gptq_to_awq(want_w, want_z)
            for layout in ("contiguous", "transposed", "uint32"):
                tw, tz = torch.from_numpy(qw).to(dev), torch.from_numpy(qz).to(dev)
                if layout == "transposed":
                    tw, tz = tw.mT.contiguous().mT, tz.mT.contiguous().mT
                elif layout == "uint32":
                    tw, tz = tw.view(torch.uint32), tz.view(torch.uint32)
                w, z = packq.fast_awq_to_gptq(tw, tz)
                w2, z2 = packq.gptq_to_awq(w, z)
                for name, got, want in (("to_gptq w", w, want_w), ("to_gptq z", z, want_z),
                                        ("to_awq w", w2, back_w), ("to_awq z", z2, back_z)):
                    checked += 1
                    if got.device.type != "cuda" or not np.array_equal(got.cpu().numpy(), want):
                        failures.append(f"torch {shape} {layout} {name}")
            jw, jz = jax.device_put(qw, gpu), jax.device_put(qz, gpu)
            for name, got, want in zip(("jax w", "jax z"), packq.fast_awq_to_gptq(jw, jz), (want_w, want_z)):
                checked += 1
                if not np.array_equal(np.asarray(got), want):
                    failures.append(f"jax {shape} {name}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "jax": jax.__version__,
                      "triton": __import__("triton").__version__, "arrays_checked": checked,
                      "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
