"""Make the bundled example: a tiny Llama-shaped AWQ (gemm) checkpoint in two shards.

It quantizes random weights the way AutoAWQ does (group-wise asymmetric
min-max over the input dimension, zero-points clamped to 0..15) and packs
them value by value in AWQ's interleaved order, without packq. Some groups
are made non-negative so that their zero-point is 0, the case upstream
exllamav2 gets wrong. Non-quantized tensors are bfloat16. Needs torch and
safetensors (the reference writer). Run: python scripts/make_example.py [DST]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB, GROUP = 256, 768, 2, 4, 1024, 128
DEFAULT = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq"


def quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AWQ min-max quantization of w (K, N): q (K, N), zeros (K/G, N), scales (K/G, N) float16."""
    k, n = w.shape
    wg = w.reshape(k // group, group, n)
    wmax, wmin = wg.max(axis=1), wg.min(axis=1)
    scales = (np.maximum(wmax - wmin, 1e-5) / 15).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(np.round(-wmin / s), 0, 15).astype(np.int64)
    q = np.clip(np.round(wg / s[:, None, :]) + zeros[:, None, :], 0, 15).astype(np.int64)
    return q.reshape(k, n), zeros, scales


def pack_awq(values: np.ndarray) -> np.ndarray:
    """Pack (R, C) values 0..15 along columns in AWQ order, one value at a time."""
    rows, cols = values.shape
    out = np.zeros((rows, cols // 8), dtype=np.uint32)
    v = values.tolist()
    for r in range(rows):
        row = v[r]
        for c in range(cols // 8):
            word = 0
            for slot in range(8):
                word |= row[8 * c + AWQ_PACK_ORDER[slot]] << (4 * slot)
            out[r, c] = word
    return out.view(np.int32)


def main(dst: Path = DEFAULT) -> None:
    rng = np.random.default_rng(7)
    shapes = {  # name -> (in_features K, out_features N)
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
        "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTERMEDIATE), "mlp.up_proj": (HIDDEN, INTERMEDIATE),
        "mlp.down_proj": (INTERMEDIATE, HIDDEN),
    }

    def bf16(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = bf16(VOCAB, HIDDEN)
    for layer in range(LAYERS):
        t = shards[layer]
        p = f"model.layers.{layer}"
        for name, (k, n) in shapes.items():
            w = rng.standard_normal((k, n)).astype(np.float32) * 0.02  # AWQ stores W transposed: (K, N)
            if layer == 0 and name == "self_attn.q_proj":
                w[:GROUP, :16] = np.abs(w[:GROUP, :16])  # non-negative groups: zero-point 0
            q, z, s = quantize(w, GROUP)
            t[f"{p}.{name}.qweight"] = torch.from_numpy(pack_awq(q))
            t[f"{p}.{name}.qzeros"] = torch.from_numpy(pack_awq(z))
            t[f"{p}.{name}.scales"] = torch.from_numpy(s)
        t[f"{p}.input_layernorm.weight"] = bf16(HIDDEN) + 1
        t[f"{p}.post_attention_layernorm.weight"] = bf16(HIDDEN) + 1
    shards[1]["model.norm.weight"] = bf16(HIDDEN) + 1
    shards[1]["lm_head.weight"] = bf16(VOCAB, HIDDEN)

    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(dst / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None,
        },
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}, indent=2) + "\n")
    print(f"wrote {dst} ({total} tensor bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
