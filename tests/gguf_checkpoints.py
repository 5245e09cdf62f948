"""Tiny Llama-shaped quantized checkpoints for the GGUF tests, packed by an independent bit-stream packer,
and a small stand-in for gguf_model.describe (Llama names and the q/k permutation, no tokenizer)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from test_widths import stream_pack  # the independent bit-stream packer every width test shares

HIDDEN, FFN, HEADS, VOCAB, LAYERS = 64, 128, 2, 64, 1
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (HIDDEN, FFN), "mlp.up_proj": (HIDDEN, FFN), "mlp.down_proj": (FFN, HIDDEN)}


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (truncated: these are test values), as uint16."""
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_gptq(root: Path, bits: int = 4, group: int = 32, sym: bool = False, seed: int = 0, act_order: bool = False,
              scale_dtype: str = "F16", fmt: str = "gptq_v2", edit=None, vocab: int = VOCAB,
              word: bool = False) -> dict:
    """A 1-layer Llama GPTQ checkpoint; returns {module: (q (K, N), z (G, N), s float32 (G, N), g_idx)}."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    truth = {}
    for layer in range(LAYERS):
        for name, (k, n) in LINEARS.items():
            prefix = f"model.layers.{layer}.{name}"
            groups = 1 if group == -1 else k // group
            q = rng.integers(0, 1 << bits, (k, n))
            z = np.full((groups, n), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, (groups, n))
            s = rng.uniform(0.002, 0.02, (groups, n)).astype(np.float32)
            if name in ("self_attn.q_proj", "self_attn.k_proj"):
                s = s * 16  # sharp attention, so that the rotary (and llama.cpp's q/k row order) matters
            s = s.astype(np.float16).astype(np.float32)  # fp16 values, whatever dtype stores them
            g_idx = (np.arange(k) // (k // groups)).astype(np.int32)
            if act_order:
                g_idx = rng.permutation(g_idx).astype(np.int32)
            stored_z = z if fmt == "gptq_v2" else (z - 1) % (1 << bits)
            tensors[f"{prefix}.qweight"] = stream_pack(q.T, bits).T.copy()
            tensors[f"{prefix}.qzeros"] = stream_pack(stored_z, bits)
            if word:  # GPTQModel's v1: one 32-bit subtraction of 0x11..1 from the v2 words (borrows cross fields)
                ones = sum(1 << (bits * i) for i in range(32 // bits))
                v2 = stream_pack(z, bits).view(np.uint32).astype(np.int64)
                tensors[f"{prefix}.qzeros"] = ((v2 - ones) % (1 << 32)).astype(np.uint32).view(np.int32)
            tensors[f"{prefix}.scales"] = {"F16": s.astype(np.float16), "F32": s, "BF16": bf16(s)}[scale_dtype]
            tensors[f"{prefix}.g_idx"] = g_idx
            truth[prefix] = (q, z, s, g_idx)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = bf16(1 + rng.standard_normal(HIDDEN) * 0.1)
    tensors["model.embed_tokens.weight"] = bf16(rng.standard_normal((vocab, HIDDEN)))
    tensors["model.norm.weight"] = bf16(1 + rng.standard_normal(HIDDEN) * 0.1)
    tensors["lm_head.weight"] = bf16(rng.standard_normal((vocab, HIDDEN)) * 0.2)
    if edit is not None:
        edit(tensors)
    root.mkdir(parents=True)
    _save(root / "model.safetensors", tensors, {n for n in tensors if n.endswith((".weight",)) or
                                                 (scale_dtype == "BF16" and n.endswith(".scales"))})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False,
              "quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                                      "sym": sym, "checkpoint_format": fmt,
                                      "meta": {"quantizer": ["gptqmodel:7.6.0"]} if word else
                                      {"quantizer": ["packq:0.1.0"], "packq_v1_zeros": "field"}}}
    (root / "config.json").write_text(json.dumps(config))
    return truth


def _save(path: Path, tensors: dict[str, np.ndarray], bf16_names: set[str]) -> None:
    """safetensors with the uint16 arrays named in ``bf16_names`` stored as BF16 (the NumPy writer has no bfloat16)."""
    save_file({k: v for k, v in tensors.items()}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for name in bf16_names:
        if header[name]["dtype"] == "U16":
            header[name]["dtype"] = "BF16"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def rotary_perm(rows: int, heads: int) -> tuple[int, ...]:
    """llama.cpp's q/k row order for Llama (convert_hf_to_gguf's permute): row r of the result is source row perm[r]."""
    return tuple(np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1).tolist())


@dataclass(frozen=True)
class GGUFTensor:  # the seam's (GGUF_INTERFACE.md), as gguf_model defines it
    name: str
    sources: tuple[str, ...]
    quantized: bool
    row_perm: tuple[int, ...] | None = None
    plain: str = "as-stored"
    values: tuple[float, ...] | None = None


@dataclass
class GGUFModel:
    arch: str
    metadata: list
    tensors: list
    dropped: dict = field(default_factory=dict)


LLAMA = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def describe(root, config, shapes, modules):
    """A Llama-only stand-in for packq.checkpoint.gguf_model.describe (the seam's interface), without a tokenizer."""
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    arch = "llama"
    meta = [("general.architecture", arch, None), ("general.name", "tiny", None),
            (f"{arch}.context_length", config["max_position_embeddings"], None),
            (f"{arch}.embedding_length", config["hidden_size"], None),
            (f"{arch}.block_count", config["num_hidden_layers"], None)]
    tensors = [GGUFTensor("token_embd.weight", ("model.embed_tokens.weight",), False)]
    for layer in range(config["num_hidden_layers"]):
        for hf, g in LLAMA.items():
            name = f"model.layers.{layer}.{hf}"
            if name in modules:
                perm = None
                if hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    perm = rotary_perm(modules[name][1], heads if hf == "self_attn.q_proj" else kv)
                tensors.append(GGUFTensor(f"blk.{layer}.{g}.weight", (name,), True, perm))
            else:
                tensors.append(GGUFTensor(f"blk.{layer}.{g}.weight", (f"{name}.weight",), False, plain="f32"))
    tensors += [GGUFTensor("output_norm.weight", ("model.norm.weight",), False, plain="f32"),
                GGUFTensor("output.weight", ("lm_head.weight",), False)]
    return GGUFModel(arch, meta, tensors, {})


TEXT = ("the quick brown fox jumps over the lazy dog; packq writes GGUF files exactly, block by block, "
        "and llama.cpp reads them back: 0123456789 Hello, World! ") * 4


def add_tokenizer(root: Path) -> int:
    """A small byte-level BPE tokenizer.json trained here on made-up text (no download); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


def make_from(root: Path, config: dict, shapes: dict, modules: dict, bits: int = 4, group: int = 32, seed: int = 0,
              sym: bool = False) -> dict:
    """A GPTQ v2 checkpoint of any architecture from (config, plain shapes, modules (K, N)) as gguf_model's tests
    describe them; plain tensors bf16 (1-D ones near 1, as norms are), inv_freq float32. Returns the modules' truth."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    truth = {}
    for prefix, (k, n) in modules.items():
        groups = k // group
        q = rng.integers(0, 1 << bits, (k, n))
        z = np.full((groups, n), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, (groups, n))
        s = rng.uniform(0.002, 0.02, (groups, n)).astype(np.float16).astype(np.float32)
        g = (np.arange(k) // group).astype(np.int32)
        tensors |= {f"{prefix}.qweight": stream_pack(q.T, bits).T.copy(), f"{prefix}.qzeros": stream_pack(z, bits),
                    f"{prefix}.scales": s.astype(np.float16), f"{prefix}.g_idx": g}
        truth[prefix] = (q, z, s, g)
    bf = set()
    for name, shape in shapes.items():
        if name.endswith("inv_freq"):
            tensors[name] = rng.random(shape).astype(np.float32)
            continue
        values = 1 + rng.standard_normal(shape) * 0.1 if len(shape) == 1 else rng.standard_normal(shape) * 0.2
        tensors[name] = bf16(values)
        bf.add(name)
    root.mkdir(parents=True)
    _save(root / "model.safetensors", tensors, bf)
    config = {**config, "torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
        "checkpoint_format": "gptq_v2"}}
    (root / "config.json").write_text(json.dumps(config))
    return truth
