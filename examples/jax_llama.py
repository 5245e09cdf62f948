"""A tiny Llama forward pass in JAX, its weights loaded by packq straight from the AWQ checkpoint.

    python examples/jax_llama.py [examples/tiny-llama-awq]

packq.jax.load dequantizes every quantized projection on the devices (layout="dequantized", float32,
(in, out) so that y = x @ W) and shards its output columns over all devices; embeddings and norms
load as stored (bfloat16). The logits are compared with a float32 NumPy forward pass built from the
same checkpoint, dequantized by packq on NumPy: they agree within 1e-4 (relative to the largest logit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import packq
import packq.jax
from packq.checkpoint.folder import open_checkpoint

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-4  # max |JAX - NumPy| over max |logit|, both float32


def rope(x, positions, theta):
    """Rotary embeddings, Llama's half-split convention; x (T, heads, head_dim)."""
    half = x.shape[-1] // 2
    freqs = 1.0 / theta ** (np.arange(half, dtype=np.float32) / half)
    angles = positions[:, None] * freqs[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1) if isinstance(x, np.ndarray) else \
        jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def forward(w: dict, cfg: dict, tokens, xp):
    """Logits (T, vocab) of a Llama decoder for one sequence; ``xp`` is numpy or jax.numpy, ``w`` float32."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, eps, theta = cfg["num_key_value_heads"], cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    hd = h // heads
    t = len(tokens)
    pos = np.arange(t, dtype=np.float32)
    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)

    def norm(x, weight):
        return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = norm(x, w[f"{p}.input_layernorm.weight"])
        q = rope((a @ w[f"{p}.self_attn.q_proj.weight"]).reshape(t, heads, hd), pos, theta)
        k = rope((a @ w[f"{p}.self_attn.k_proj.weight"]).reshape(t, kv, hd), pos, theta)
        v = (a @ w[f"{p}.self_attn.v_proj.weight"]).reshape(t, kv, hd)
        k, v = (xp.repeat(k, heads // kv, axis=1), xp.repeat(v, heads // kv, axis=1))
        scores = xp.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd)) + mask
        scores = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
        attn = xp.einsum("hqk,khd->qhd", scores / xp.sum(scores, axis=-1, keepdims=True), v).reshape(t, h)
        x = x + attn @ w[f"{p}.self_attn.o_proj.weight"]
        m = norm(x, w[f"{p}.post_attention_layernorm.weight"])
        gate = m @ w[f"{p}.mlp.gate_proj.weight"]
        x = x + (gate / (1 + xp.exp(-gate)) * (m @ w[f"{p}.mlp.up_proj.weight"])) @ w[f"{p}.mlp.down_proj.weight"]
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def load_jax(folder: Path) -> dict:
    """Every weight on the devices, float32; each projection's output columns sharded over all devices."""
    mesh = Mesh(np.array(jax.devices()), ("model",))
    params = packq.jax.load(folder, layout="dequantized", dtype=jnp.float32,
                            shardings={r".*_proj\.weight": NamedSharding(mesh, P(None, "model"))})
    return {name: a.astype(jnp.float32) for name, a in params.items()}


def load_numpy(folder: Path) -> dict:
    """The float32 reference weights: packq on NumPy dequantizes each module, (in, out) like the loader's."""
    ckpt, raw = open_checkpoint(folder), {}
    for shard in ckpt.shards.values():
        with shard.open() as f:
            for name in shard.tensors:
                raw[name] = f.floats(name) if shard.tensors[name].dtype in ("F16", "BF16", "F32") else f.array(name)
    w = {name: a.astype(np.float32) for name, a in raw.items() if a.dtype.kind == "f"}
    for p in ckpt.modules:
        w[f"{p}.weight"] = packq.dequantize_awq(raw[f"{p}.qweight"], raw[f"{p}.qzeros"], raw[f"{p}.scales"]).astype(np.float32)
    return w


def main(folder: Path = HERE / "tiny-llama-awq") -> float:
    cfg = json.loads((folder / "config.json").read_text())
    tokens = [1, 17, 256, 3, 999, 42, 7, 128]
    logits = jax.jit(lambda w: forward(w, cfg, tokens, jnp))(load_jax(folder))
    ref = forward(load_numpy(folder), cfg, tokens, np)
    err = float(np.max(np.abs(np.asarray(logits) - ref)) / np.max(np.abs(ref)))
    print(f"logits {logits.shape} on {len(jax.devices())} device(s); max |JAX - NumPy| / max |logit| = {err:.2e} "
          f"(tolerance {TOLERANCE:g}); next token {int(np.argmax(ref[-1]))}")
    assert np.asarray(logits).shape == ref.shape and err <= TOLERANCE
    return err


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tiny-llama-awq")
