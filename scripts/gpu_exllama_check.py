"""On a CUDA machine: AWQ weights -> packq on JAX (GPU) -> DLPack -> exllamav2's gemm_half_q_half.

Quantizes random weights AWQ-style (group-wise min-max, K x N = 4096 x 4096, group 128), converts
them with packq.interop.exllama_tensors from JAX arrays on the GPU (no host round trip: the torch
tensors must share the JAX buffers), runs exllamav2's GPTQ matmul, and compares with an fp32 matmul
of the dequantized AWQ weights. Three cases:

  1. zero-points in 1..15                       -> relative error must be <= 2e-3
  2. zero-points in 0..15                       -> the kernel's error is printed; packq's detection must
                                                   name exactly the columns whose error is large
  3. as 2, every zero-0 group holds values <= 14 -> rebias; the whole matmul must match (<= 2e-3)

Needs exllamav2 0.3.2 importable (its extension builds on first import). Exit status 1 on failure.
"""

from __future__ import annotations

import sys
import time

import numpy as np

K, N, G, M = 4096, 4096, 128, 64
TOL = 2e-3


def quantize(rng, zero0_fraction: float, fixable: bool):
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.02
    groups = K // G
    pos = rng.random((groups, N)) < zero0_fraction  # (group, column) pairs made non-negative: zero-point 0
    wg = w.reshape(groups, G, N)
    wg[:] = np.where(pos[:, None, :], np.abs(wg), wg)
    wmax, wmin = wg.max(1), wg.min(1)
    s = (np.maximum(wmax - wmin, 1e-5) / 15).astype(np.float16)
    z = np.clip(np.round(-wmin / s.astype(np.float32)), 0, 15).astype(np.int64)
    if zero0_fraction == 0:
        z = np.maximum(z, 1)
    q = np.clip(np.round(wg / s.astype(np.float32)[:, None, :]) + z[:, None, :], 0, 15).astype(np.int64)
    if fixable:
        q = np.where((z == 0)[:, None, :], np.minimum(q, 14), q)
    return q.reshape(K, N), z, s


def main() -> int:
    import jax
    import jax.numpy as jnp
    import torch
    from exllamav2 import ext
    from packq.interop import exllama_tensors

    import packq

    gpu = jax.devices("gpu")[0]
    name = torch.cuda.get_device_name()
    print(f"device: {name}; jax {jax.__version__} on {gpu}; torch {torch.__version__}")
    rng = np.random.default_rng(0)
    torch.cuda.set_device(0)
    x = torch.randn(M, K, device="cuda:0", dtype=torch.float16)
    temp_dq = torch.empty(K * N, dtype=torch.float16, device="cuda:0")
    ok = True
    cases = [("zeros 1..15", 0.0, False, "keep"), ("zeros 0..15", 0.02, False, "keep"),
             ("zeros 0..15, rebias (zero-0 groups <= 14)", 0.02, True, "rebias")]
    for label, frac, fixable, mode in cases:
        q, z, s = quantize(rng, frac, fixable)
        awq = lambda v: packq.pack(packq.apply_order(v, order=packq.AWQ_PACK_ORDER))  # noqa: E731
        qw, qz = awq(q), awq(z)
        jw, jz, js = (jax.device_put(jnp.asarray(a), gpu) for a in (qw, qz, s))
        jax.block_until_ready((jw, jz, js))
        t0 = time.perf_counter()
        t = exllama_tensors(jw, jz, js, zero_points=mode, unfixable="warn")
        torch.cuda.synchronize()
        conv_ms = 1e3 * (time.perf_counter() - t0)
        assert t.qweight.is_cuda and t.qzeros.is_cuda and t.scales.is_cuda
        shared = t.scales.data_ptr() == js.unsafe_buffer_pointer()
        ref_w = packq.dequantize_awq(qw, qz, s.astype(np.float32))  # exact in fp32
        ref = (x.float() @ torch.from_numpy(ref_w).to(x.device)).float()
        handle = ext.make_q_matrix(t.as_dict(), temp_dq)
        out = torch.empty(M, N, device=x.device, dtype=torch.float16)
        ext.exllamav2_ext.gemm_half_q_half(x, handle, out, False)
        torch.cuda.synchronize()
        err = float((out.float() - ref).norm() / ref.norm())
        col_err = ((out.float() - ref).norm(dim=0) / ref.norm(dim=0)).cpu().numpy()
        zero0_cols = set(np.nonzero((z == 0).any(0))[0].tolist())
        bad_cols = set(np.nonzero(col_err > 10 * TOL)[0].tolist())
        print(f"\n[{label}]  (group, column) zero-points of 0: {int((z == 0).sum())} in {len(zero0_cols)} columns")
        print(f"  packq: detected {t.zero_point_0}, rebiased {t.rebiased}, unfixable {t.unfixable}; "
              f"conversion {conv_ms:.2f} ms on {gpu.platform}; scales shared with JAX: {shared}")
        print(f"  exllamav2 gemm_half_q_half vs fp32 dequantized matmul: relative error {err:.3e}")
        ok &= shared and t.zero_point_0 == int((z == 0).sum())
        if mode == "rebias" or frac == 0:
            ok &= err <= TOL
            print(f"  {'PASS' if err <= TOL else 'FAIL'}: error <= {TOL}")
        else:
            match = bad_cols == zero0_cols
            ok &= match and err > TOL
            print(f"  columns with large error: {len(bad_cols)}; equal to the columns packq flags: {match}")
    print("\nALL PASS" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
