"""The model around the tensors of a GGUF file: architecture, hyperparameters, tensor names, tokenizer.

Pure planning from a Hugging Face folder's config.json and tokenizer files (never tensor data): which
llama.cpp architecture a checkpoint is, its hyperparameters under llama.cpp's keys, what every checkpoint
tensor is called in GGUF and in which order, which rows move (Llama's rotary permutation of q/k), which
experts are stacked into one 3-D tensor, and the vocabulary, so that llama.cpp tokenizes text exactly as
the source's tokenizer does. The GGUF container (``packq.checkpoint.containers``) writes what this plans.

Architectures are data, not branches, in the manner of llama.cpp's own converter (one base, small
overrides; ``conversion/llama.py``, ``conversion/qwen.py`` of llama.cpp 0c1e570) and gguf-py's
``TensorNameMap``: :data:`ARCHITECTURES` maps the name config.json's ``architectures`` gives to an
:class:`Architecture` that states only where it differs from the base. Keys, value types and tensor
names come from gguf-py itself (the optional ``gguf`` package, ``pip install packq[gguf]``), imported
only inside the functions that need it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packq.errors import CheckpointError

__all__ = ["ARCHITECTURES", "Architecture", "GGUFModel", "GGUFTensor", "describe", "pre_tokenizer"]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file, and the checkpoint tensors it is made of."""

    name: str  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    #: quantized-module prefixes when quantized, else plain tensor names; several: experts stacked in this order
    sources: tuple[str, ...]
    quantized: bool
    #: permutation of output rows (torch out_features) applied before encoding: whole rows move, with their
    #: scales and zeros (quantized) or their values (plain: a q/k bias, an unquantized q/k projection)
    row_perm: tuple[int, ...] | None = None
    plain: str = "as-stored"  # plain tensors only: "f32" (norms, biases, the router) or "as-stored"
    #: a tensor no checkpoint stores, computed from config.json (Llama 3.1's rope_freqs): written as F32
    values: tuple[float, ...] | None = None


@dataclass
class GGUFModel:
    """Everything of a GGUF file but the tensor data, in write order."""

    arch: str  # general.architecture
    metadata: list[tuple[str, Any, Any]]  # (key, value, gguf.GGUFValueType), every KV but the writer's own
    tensors: list[GGUFTensor]
    dropped: dict[str, str]  # checkpoint tensor -> why it is not written


# --- architectures, as data ------------------------------------------------------------------------

#: (gguf-py GGUFWriter method, config.json keys in llama.cpp's order of preference, required); the base of
#: every architecture, as llama.cpp's ``TextModel.set_gguf_parameters`` reads them
BASE_HPARAMS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("add_block_count", ("n_layers", "num_hidden_layers", "n_layer", "num_layers"), True),
    ("add_context_length", ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                            "model_max_length"), True),
    ("add_embedding_length", ("hidden_size", "n_embd", "dim"), True),
    ("add_feed_forward_length", ("intermediate_size", "n_inner", "hidden_dim"), True),
    ("add_head_count", ("num_attention_heads", "n_head", "n_heads"), True),
    ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads"), False),
)
#: written after the rotary parameters, as llama.cpp does
BASE_HPARAMS_LATE: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps"), True),
    ("add_expert_count", ("num_local_experts", "num_experts"), False),
    ("add_expert_used_count", ("num_experts_per_tok", "num_experts_per_token"), False),
    # an explicit head_dim (Qwen3: 128 with hidden 2048 / 16 heads) is not hidden / heads: say it
    ("add_key_length", ("head_dim",), False),
    ("add_value_length", ("head_dim",), False),
)


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture becomes a llama.cpp model: only where it differs from the base."""

    arch: str  # gguf.MODEL_ARCH member name ("LLAMA"); general.architecture is its MODEL_ARCH_NAMES value
    #: llama.cpp's LlamaModel.permute of q/k rows: llama.cpp rotates interleaved pairs (NORM rope) where
    #: Hugging Face rotates halves; NEOX families (Qwen) rotate halves too and are not permuted
    rotary_permute: bool = False
    #: hyperparameters beyond the base, same form as BASE_HPARAMS
    hparams: tuple[tuple[str, tuple[str, ...], bool], ...] = ()
    llama_extras: bool = False  # LlamaModel: {arch}.vocab_size and rope.dimension_count
    moe: bool = False  # experts stacked into ffn_{gate,up,down}_exps; expert counts required
    #: tokenizer_config.json's add_prefix_space written as tokenizer.ggml.add_space_prefix (LlamaModel only)
    space_prefix: bool = False
    #: config values llama.cpp computes differently: (config key, the value llama.cpp assumes, transformers'
    #: default where config.json omits the key, why)
    assumes: tuple[tuple[str, Any, Any, str], ...] = ()


_LLAMA = Architecture("LLAMA", rotary_permute=True, llama_extras=True, space_prefix=True)
_QWEN_MOE = (("add_expert_feed_forward_length", ("moe_intermediate_size",), True),)

#: config.json "architectures" name -> how llama.cpp converts it (its converter registers the same names)
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,  # llama.cpp converts Mistral as "llama"
    "MixtralForCausalLM": Architecture("LLAMA", rotary_permute=True, llama_extras=True, space_prefix=True, moe=True),
    "Qwen2ForCausalLM": Architecture("QWEN2"),
    "Qwen3ForCausalLM": Architecture("QWEN3"),
    "Qwen3MoeForCausalLM": Architecture(
        "QWEN3MOE", hparams=_QWEN_MOE, moe=True,
        assumes=(("norm_topk_prob", True, False, "llama.cpp's qwen3moe always renormalizes the top-k router weights"),
                 ("decoder_sparse_step", 1, 1, "llama.cpp's qwen3moe has experts in every layer"),
                 ("mlp_only_layers", [], [], "llama.cpp's qwen3moe has experts in every layer"))),
}

#: tensors llama.cpp's converter never writes (transformers recomputes them)
DROPPED = ((re.compile(r"\.rotary_emb\.inv_freq$"), "rotary inverse frequencies: llama.cpp computes them"),
           (re.compile(r"\.attention\.(masked_)?bias$"), "attention mask buffer: llama.cpp computes it"))
#: one expert's tensor, e.g. model.layers.3.mlp.experts.7.gate_proj or ...block_sparse_moe.experts.7.w1
EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<xid>\d+)\.(?P<w>[^.]+)(?P<suffix>\.weight|\.bias)?$")
#: GGUF tensors that llama.cpp wants in F32 whatever the checkpoint stores (its converter forces them)
F32_KINDS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF needs llama.cpp's gguf-py: pip install 'packq[gguf]'") from None
    return gguf


def _find(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _architecture(config: dict[str, Any], where: Path) -> tuple[str, Architecture]:
    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"{where}: architecture {name or 'unstated'} has no GGUF conversion in packq; "
                              f"supported: {supported}")
    return name, ARCHITECTURES[name]


class _Recorder:
    """A GGUFWriter that writes no file: its methods give llama.cpp's keys and value types, in order."""

    def __init__(self, arch_name: str) -> None:
        gguf = _gguf()
        self.writer = gguf.GGUFWriter(None, arch_name)

    def __getattr__(self, method: str) -> Callable[..., None]:
        return getattr(self.writer, method)

    def items(self) -> list[tuple[str, Any, Any]]:
        return [(k, v.value, v.type) for k, v in self.writer.kv_data[0].items()]


def _hparams(w: _Recorder, table, config: dict[str, Any], where: Path, hf_name: str) -> None:
    for method, keys, required in table:
        value = _find(config, keys)
        if value is None:
            if required:
                raise CheckpointError(f"{where}: config.json has no {keys[0]} ({hf_name} needs it for GGUF)")
            continue
        getattr(w, method)(value)


def _rope(w: _Recorder, config: dict[str, Any], where: Path, arch: Architecture) -> tuple[float, ...] | None:
    """Rotary parameters as llama.cpp's TextModel reads them; the rope_freqs values of Llama 3.1's scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    theta = _find(config, ("rope_theta", "rotary_emb_base"))
    params.setdefault("rope_theta", 10000.0 if theta is None else theta)  # transformers' and llama.cpp's default
    rope_type = str(params.get("rope_type", params.get("type")) or "default")
    freqs = None
    gguf = _gguf()
    factor = params.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        if "original_max_position_embeddings" not in params:
            raise CheckpointError(f"{where}: yarn rope scaling without original_max_position_embeddings")
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for key, method in (("extrapolation_factor", "add_rope_scaling_yarn_ext_factor"),
                            ("attention_factor", "add_rope_scaling_yarn_attn_factor"),
                            ("attn_factor", "add_rope_scaling_yarn_attn_factor"),
                            ("beta_fast", "add_rope_scaling_yarn_beta_fast"),
                            ("beta_slow", "add_rope_scaling_yarn_beta_slow")):
            if params.get(key) is not None:
                getattr(w, method)(params[key])
    elif rope_type.lower() == "llama3" and arch.llama_extras:
        freqs = _llama3_rope_freqs(config, params)
    elif rope_type != "default":
        raise CheckpointError(f"{where}: rope scaling {rope_type!r} is not one llama.cpp computes for this "
                              f"architecture; packq converts default, linear, yarn and (llama) llama3")
    w.add_rope_freq_base(params["rope_theta"])
    return freqs


def _llama3_rope_freqs(config: dict[str, Any], params: dict[str, Any]) -> tuple[float, ...]:
    """Llama 3.1's per-frequency rope factors, the rope_freqs tensor llama.cpp reads (its LlamaModel's formula)."""
    import math

    import numpy as np

    base = params.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # float32 throughout, as llama.cpp's converter computes it with torch
    freqs = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(np.float32(x)) for x in out)


@functools.cache  # (every layer's q and k share one: 25 ms of a 7B plan's start, made 16 times as Python ints)
def _permutation(rows: int, heads: int) -> tuple[int, ...]:
    """llama.cpp's LlamaModel.permute as a row permutation: new row r is old row perm[r]."""
    import numpy as np

    if rows % (2 * heads):
        raise CheckpointError(f"q/k rows {rows} are not a whole number of rotary pairs of {heads} heads")
    idx = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    return tuple(idx.tolist())


# --- tensors ---------------------------------------------------------------------------------------


def _tensors(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], modules: dict[str, tuple[int, int]],
             arch: Architecture, arch_name: str, where: Path) -> tuple[list[GGUFTensor], dict[str, str]]:
    gguf = _gguf()
    model_arch = gguf.MODEL_ARCH[arch.arch]
    blocks = _find(config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    tmap = gguf.get_tensor_name_map(model_arch, blocks)
    kinds = gguf.MODEL_TENSORS[model_arch]
    n_head = _find(config, ("num_attention_heads", "n_head", "n_heads"))
    n_kv = _find(config, ("num_key_value_heads", "n_kv_heads")) or n_head
    tied = bool(config.get("tie_word_embeddings", False))
    dropped: dict[str, str] = {}
    # every source: (name to map, checkpoint name, quantized)
    items = [(p + ".weight", p, True) for p in modules] + [(n, n, False) for n in shapes]
    experts: dict[tuple[str, str], dict[int, tuple[str, bool]]] = {}
    single: list[tuple[str, str, bool]] = []
    for key, name, quantized in items:
        why = next((why for pat, why in DROPPED if pat.search(name)), None)
        if why is not None:
            dropped[name] = why
            continue
        if tied and not quantized and key in ("lm_head.weight", "model.lm_head.weight"):
            dropped[name] = "tied to the token embedding (tie_word_embeddings): llama.cpp reads token_embd"
            continue
        m = EXPERT.match(key)
        if m and arch.moe:
            merged = f"{m['base']}.{m['w']}{m['suffix'] or ''}"
            experts.setdefault((merged, "q" if quantized else "p"), {})[int(m["xid"])] = (name, quantized)
        else:
            single.append((key, name, quantized))
    planned: list[tuple[Any, str, tuple[str, ...], bool, tuple[int, ...] | None, str]] = []

    def place(key: str) -> tuple[Any, str]:
        found = tmap.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise CheckpointError(f"{where}: tensor {key} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[model_arch]} "
                                  f"(gguf-py's tensor map): packq cannot write it")
        return found

    n_experts = _find(config, ("num_local_experts", "num_experts"))
    for (merged, _), by_xid in sorted(experts.items()):
        kind, gname = place(merged)
        if sorted(by_xid) != list(range(n_experts or 0)):
            raise CheckpointError(f"{where}: {merged}: experts {sorted(by_xid)[:8]}... stored, config.json says "
                                  f"{n_experts}: cannot stack them")
        qs = {q for _, q in by_xid.values()}
        if len(qs) != 1:
            raise CheckpointError(f"{where}: {merged}: some experts quantized and some not: cannot stack them")
        planned.append((kind, gname, tuple(by_xid[x][0] for x in range(n_experts)), qs.pop(), None, "as-stored"))
    for key, name, quantized in single:
        kind, gname = place(key)
        perm = None
        if arch.rotary_permute and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            rows = modules[name][1] if quantized else shapes[name][0]
            perm = _permutation(rows, n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else n_kv)
        plain = "as-stored"
        ndim = 2 if quantized else len(shapes[name])
        if ndim <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or kind.name in F32_KINDS:
            plain = "f32"  # llama.cpp's converter writes these as F32 whatever the checkpoint stores
        planned.append((kind, gname, (name,), quantized, perm, plain))
    seen: dict[str, tuple[str, ...]] = {}
    for _, gname, sources, *_ in planned:
        if gname in seen:
            raise CheckpointError(f"{where}: {sources[0]} and {seen[gname][0]} are both GGUF tensor {gname}")
        seen[gname] = sources

    def order(p: tuple) -> tuple:
        kind, gname = p[0], p[1]
        bid = re.match(r"blk\.(\d+)\.", gname)
        where_ = 0 if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.ROPE_FREQS) else (1 if bid else 2)
        return (where_, int(bid[1]) if bid else 0, kinds.index(kind) if kind in kinds else len(kinds),
                gname.endswith(".bias"), gname)

    tensors = [GGUFTensor(g, s, q, perm, "as-stored" if q else plain) for _, g, s, q, perm, plain in sorted(planned, key=order)]
    if not any(t.name == "token_embd.weight" for t in tensors):
        raise CheckpointError(f"{where}: no token embedding (model.embed_tokens.weight) among the tensors")
    if not tied and not any(t.name == "output.weight" for t in tensors):
        raise CheckpointError(f"{where}: no lm_head.weight and tie_word_embeddings is false")
    return tensors, dropped


# --- tokenizer -------------------------------------------------------------------------------------

#: llama.cpp's fixed text: a BPE tokenizer's ids on it, hashed, name its pre-tokenizer (get_vocab_base_pre)
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: sha256 of str(ids of CHKTXT) -> tokenizer.ggml.pre, the table llama.cpp 0c1e570's converter identifies
#: BPE tokenizers by (convert_hf_to_gguf_update.py computes it from each tokenizer; the comment is its source).
#: Two hashes appear twice there (mpt/olmo, bert-bge/jina-v2-en); its last test wins, as here
PRE_BY_HASH: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",  # THUDM/glm-4-9b-chat
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",  # THUDM/glm-4-9b-chat
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",  # THUDM/glm-4-9b-hf
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",  # zai-org/GLM-4.5-Air
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",  # zai-org/GLM-4.7-Flash
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # sapienzanlp/Minerva-7B-base-v1.0
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",  # tencent/Hunyuan-A13B-Instruct
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",  # tencent/Hunyuan-4B-Instruct
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",  # tencent/Hy4-preview
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",  # tiiuae/Falcon-H1-0.5B-Base
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",  # tiiuae/Falcon-H1-1B-Base
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",  # tiiuae/Falcon-H1-7B-Base
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",  # tiiuae/Falcon-H1-34B-Base
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",  # moonshotai/Kimi-K2-Base
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",  # openbmb/MiniCPM-V-4_6
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",  # alvarobartt/grok-2-tokenizer
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",  # aari1995/German_Semantic_V3
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",  # LiquidAI/LFM2.5-8B-A1B
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",  # danish-foundation-models/DFM-Mimir
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",  # XHToken/Spark-X2.5-1.7B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-ai/deepseek-coder-6.7b-base
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # tiiuae/falcon-7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",  # BAAI/bge-large-zh-v1.5
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stabilityai/stablelm-2-zephyr-1_6b
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # smallcloudai/Refact-1_6-base
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # CohereForAI/c4ai-command-r-v01
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",  # CohereLabs/tiny-aya-base
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",  # CohereLabs/North-Mini-Code-1.0
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # allenai/OLMo-1.7-7B-hf
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # databricks/dbrx-base
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",  # jinaai/jina-reranker-v1-tiny-en
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",  # jinaai/jina-embeddings-v2-base-en
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",  # jinaai/jina-embeddings-v2-base-es
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",  # jinaai/jina-embeddings-v2-base-de
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",  # jinaai/jina-embeddings-v5-text-nano
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",  # LumiOpen/Poro-34B-chat
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",  # jinaai/jina-embeddings-v2-base-code
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",  # LumiOpen/Viking-7B
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",  # core42/jais-13b
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",  # inceptionai/Jais-2-8B-Chat
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",  # WisdomShell/CodeShell-7B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",  # bigscience/bloom
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",  # TurkuNLP/gpt3-finnish-small
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",  # LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",  # facebook/chameleon-7b
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",  # sentence-transformers/stsb-roberta-base
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",  # ai-sage/GigaChat-20B-A3B-instruct
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Infinigence/Megrez-3B-Instruct
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # deepseek-ai/DeepSeek-V3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",  # UW/OLMo2-8B-SuperBPE-t180k
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",  # trillionlabs/Trillion-7B-preview
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",  # inclusionAI/Ling-lite
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # meta-llama/Llama-4-Scout-17B-16E-Instruct
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # mistral-community/pixtral-12b
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # ByteDance-Seed/Seed-Coder-8B-Base
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",  # skt/A.X-4.0
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",  # K-intelligence/Midm-2.0-Base-Instruct
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",  # LiquidAI/LFM2.5-350M
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",  # LGAI-EXAONE/EXAONE-4.0-32B
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",  # JetBrains/Mellum-4b-base
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",  # answerdotai/ModernBERT-base
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",  # arcee-ai/Trinity-Tokenizer
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",  # inclusionAI/Ling-mini-base-2.0
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",  # ibm-granite/granite-docling-258M
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",  # MiniMaxAI/MiniMax-M2
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",  # KORMo-Team/KORMo-tokenizer
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",  # tencent/Youtu-LLM-2B
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",  # upstage/Solar-Open-100B
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",  # LGAI-EXAONE/K-EXAONE-236B-A23B
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen/Qwen3.5-9B-Instruct
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",  # jdopensource/JoyAI-LLM-Flash
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",  # kakaocorp/kanana-2-30b-a3b-instruct-2601
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",  # codefuse-ai/F2LLM-v2-4B
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",  # sarvamai/sarvam-30b
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",  # lewtun/talkie-1930-13b-it-hf
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",  # openbmb/MiniCPM5-1B
    # ibm-granite/granite-embedding-97m-multilingual-r2
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    # ibm-granite/granite-embedding-311m-multilingual-r2
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",  # JetBrains/Mellum2-12B-A2.5B-Base
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",  # poolside/Laguna-XS.2
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",  # ufakai/ufakzeka-1
}
#: structure of a tokenizer.json -> the tokenizer.ggml.pre whose pre-tokenizer llama.cpp computes the same way,
#: for tokenizers not in PRE_BY_HASH (a tokenizer trained afresh with a known model's pre-tokenizer): the
#: regex of the pre-tokenizer's Split and whether the BPE ignores merges; a match must tokenize identically,
#: which tests/test_gguf_model.py checks in llama.cpp itself
PRE_BY_STRUCTURE: dict[tuple[str, bool], str] = {}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_BY_STRUCTURE[(_LLAMA3_REGEX, True)] = "llama-bpe"
PRE_BY_STRUCTURE[(_LLAMA3_REGEX, False)] = "smaug-bpe"  # the same regex, merges not ignored
PRE_BY_STRUCTURE[(_QWEN2_REGEX, False)] = "qwen2"
PRE_BY_STRUCTURE[("gpt2-bytelevel", False)] = "gpt-2"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _structure(tokenizer_json: dict[str, Any]) -> tuple[str, bool] | None:
    """(the pre-tokenizer's split regex, or "gpt2-bytelevel" for ByteLevel's own, and ignore_merges)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    model = tokenizer_json.get("model") or {}
    ignore = bool(model.get("ignore_merges", False))
    splits = [p for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
        regex = (splits[0].get("pattern") or {}).get("Regex")
        if splits[0].get("behavior") == "Isolated" and not splits[0].get("invert") and isinstance(regex, str):
            return regex, ignore
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt2-bytelevel", ignore
    return None


def pre_tokenizer(tokenizer: Any, tokenizer_json: dict[str, Any], where: Path) -> str:
    """The ``tokenizer.ggml.pre`` llama.cpp names a BPE tokenizer by.

    As llama.cpp's converter identifies it: the sha256 of the ids the tokenizer gives a fixed text
    (:data:`CHKTXT`), looked up in :data:`PRE_BY_HASH`; a tokenizer not there (one trained afresh) by
    the structure of its pre-tokenizer (:data:`PRE_BY_STRUCTURE`). Never "default", which would
    pre-tokenize differently in llama.cpp.

    Parameters
    ----------
    tokenizer : tokenizers.Tokenizer
        The source's tokenizer.
    tokenizer_json : dict
        Its tokenizer.json, parsed.
    where : Path
        The folder, for the error message.

    Returns
    -------
    str
        The pre-tokenizer's name in llama.cpp (e.g. ``"llama-bpe"``, ``"qwen2"``).

    Raises
    ------
    CheckpointError
        If llama.cpp knows neither the hash nor the structure.

    Examples
    --------
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tok = Tokenizer(models.BPE())
    >>> tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    >>> pre_tokenizer(tok, json.loads(tok.to_str()), Path("."))
    'gpt-2'
    """
    ids = tokenizer.encode(CHKTXT).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in PRE_BY_HASH:
        return PRE_BY_HASH[digest]
    shape = _structure(tokenizer_json)
    if shape in PRE_BY_STRUCTURE:
        return PRE_BY_STRUCTURE[shape]
    raise CheckpointError(f"{where}: llama.cpp does not recognise this BPE tokenizer (pre-tokenizer hash {digest[:16]}..., "
                          f"not in llama.cpp 0c1e570's table, and no known pre-tokenizer structure): its "
                          f"tokenization in llama.cpp would differ")


def _looks_special(token: str) -> bool:
    # llama.cpp's does_token_look_special: added tokens some models do not mark special but are control tokens
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _bpe(w: _Recorder, root: Path, config: dict[str, Any]) -> None:
    """A BPE tokenizer.json as llama.cpp's _set_vocab_gpt2 writes it (tokens, types, pre; merges and specials after)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CheckpointError("a BPE tokenizer for GGUF needs the tokenizers package: pip install 'packq[gguf]'") from None
    gguf = _gguf()
    path = root / "tokenizer.json"
    data = _load_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: a {model.get('type')} tokenizer; llama.cpp reads BPE (tokenizer.json) and "
                              f"SentencePiece (tokenizer.model)")
    if model.get("byte_fallback"):
        raise CheckpointError(f"{path}: a SentencePiece tokenizer stored as BPE with byte fallback: GGUF needs its "
                              f"tokenizer.model (llama.cpp's SentencePiece vocabulary) beside it")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises its own Exception type
        raise CheckpointError(f"{path}: the tokenizers package cannot read it: {e}") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = config.get("vocab_size") or len(vocab)
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(vocab.values())} is beyond config.json's vocab_size {vocab_size}")
    pre = pre_tokenizer(tok, data, root)
    # added tokens as transformers sees them: tokenizer.json's list, tokenizer_config.json's flags over it
    added = {int(t["id"]): dict(t) for t in data.get("added_tokens", [])}
    if (root / "tokenizer_config.json").is_file():
        for i, t in (_load_json(root / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            added.setdefault(int(i), {}).update(t)
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added and added[i].get("content", token) == token:
            if not added[i].get("normalized", True):
                # llama.cpp assumes added tokens pre-normalized; its converter round-trips the others
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces, as llama.cpp does
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    _specials(w, root, load_merges=True, n_vocab=None)


def _sentencepiece(w: _Recorder, root: Path, config: dict[str, Any]) -> None:
    """tokenizer.model as llama.cpp's _set_vocab_sentencepiece writes it."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise CheckpointError("a SentencePiece tokenizer for GGUF needs the sentencepiece package: "
                              "pip install 'packq[gguf]'") from None
    gguf = _gguf()
    path = root / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: sentencepiece cannot read it: {e}") from None
    vocab_size = config.get("vocab_size") or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), int(kind)
    if (root / "added_tokens.json").is_file():
        for token, i in _load_json(root / "added_tokens.json").items():
            if isinstance(i, int) and 0 <= i < vocab_size:
                tokens[i], scores[i], types[i] = token.encode(), -1000.0, int(gguf.TokenType.USER_DEFINED)
    if (root / "tokenizer_config.json").is_file():
        for i, t in (_load_json(root / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            i = int(i)
            if i >= vocab_size:
                continue
            token = t["content"]
            if t.get("special") or _looks_special(token):
                types[i] = int(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types[i] = int(gguf.TokenType.USER_DEFINED)
            tokens[i], scores[i] = token.encode(), -1000.0
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")  # SentencePiece has no pre-tokenizer: "default" is llama.cpp's own choice here
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    _specials(w, root, load_merges=False, n_vocab=len(tokens))


def _specials(w: _Recorder, root: Path, *, load_merges: bool, n_vocab: int | None) -> None:
    """Merges, special token ids, add_bos/add_eos and the chat template: gguf-py's SpecialVocab, as llama.cpp's converter."""
    import logging

    gguf = _gguf()
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)  # its notes on post-processor templates are llama.cpp converter chatter, not the user's
    try:
        special = gguf.SpecialVocab(root, load_merges=load_merges, n_vocab=n_vocab)
    finally:
        log.setLevel(level)
    if load_merges and not special.merges:
        raise CheckpointError(f"{root}: tokenizer.json has no merges: llama.cpp's BPE needs them")
    if not (root / "chat_template.jinja").is_file() or special.chat_template is not None:
        pass
    else:
        special.chat_template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    special.add_to_gguf(w.writer, quiet=True)


def _tokenizer(w: _Recorder, root: Path, config: dict[str, Any], arch: Architecture) -> None:
    if arch.space_prefix and (root / "tokenizer_config.json").is_file():
        prefix = _load_json(root / "tokenizer_config.json").get("add_prefix_space")
        if prefix is not None:
            w.add_add_space_prefix(prefix)
    # llama.cpp's order: a tokenizer.model first (SentencePiece), else tokenizer.json (BPE)
    if (root / "tokenizer.model").is_file():
        _sentencepiece(w, root, config)
    elif (root / "tokenizer.json").is_file():
        _bpe(w, root, config)
    else:
        raise CheckpointError(f"{root}: no tokenizer.json or tokenizer.model: a GGUF file carries its tokenizer")


# --- the plan --------------------------------------------------------------------------------------


def describe(root: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
             modules: dict[str, tuple[int, int]]) -> GGUFModel:
    """The GGUF model of a Hugging Face checkpoint: architecture, metadata, tensors in file order.

    Reads config.json's values and the tokenizer files, never tensor data. Hyperparameters are
    written under llama.cpp's keys, tensor names come from gguf-py's tensor map, q/k rows of
    llama-family models are permuted for llama.cpp's rotary, MoE experts are stacked, and the
    tokenizer is the source's, so that llama.cpp tokenizes as it does.

    Parameters
    ----------
    root : Path
        The source folder (its tokenizer files are read).
    config : dict
        Its config.json.
    shapes : dict of str to tuple of int
        Every plain (not quantized) tensor's name and shape.
    modules : dict of str to (int, int)
        Every quantized module's prefix and (K, N) = (in_features, out_features).

    Returns
    -------
    GGUFModel
        Metadata as (key, value, gguf.GGUFValueType) in write order, and the tensors in file order.

    Raises
    ------
    CheckpointError
        For an architecture llama.cpp has no conversion for here (naming the supported ones), a config
        value llama.cpp computes differently, a missing or unreadable tokenizer, or a tensor with no
        place in the architecture.

    Examples
    --------
    >>> import json, pathlib, tempfile
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    >>> tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    >>> tok.save(str(root / "tokenizer.json"))
    >>> config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 3, "hidden_size": 8, "num_hidden_layers": 1,
    ...           "intermediate_size": 32, "num_attention_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
    >>> layer = "model.layers.0."
    >>> modules = {layer + p: (8, 8) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}
    >>> modules |= {layer + "mlp.gate_proj": (8, 32), layer + "mlp.up_proj": (8, 32), layer + "mlp.down_proj": (32, 8)}
    >>> shapes = {"model.embed_tokens.weight": (3, 8), "lm_head.weight": (3, 8), "model.norm.weight": (8,),
    ...           layer + "input_layernorm.weight": (8,), layer + "post_attention_layernorm.weight": (8,)}
    >>> m = describe(root, config, shapes, modules)
    >>> m.arch, [t.name for t in m.tensors][:3], m.tensors[1].row_perm
    ('llama', ['token_embd.weight', 'blk.0.attn_norm.weight', 'blk.0.attn_q.weight'], None)
    >>> [t.row_perm for t in m.tensors if t.name == "blk.0.attn_q.weight"]
    [(0, 2, 1, 3, 4, 6, 5, 7)]
    >>> dict((k, v) for k, v, _ in m.metadata)["tokenizer.ggml.pre"]
    'gpt-2'
    """
    root = Path(root)
    gguf = _gguf()
    hf_name, arch = _architecture(config, root)
    if "text_config" in config:  # llama.cpp reads a multimodal model's text part at the top level
        config = {**config, **config["text_config"]}
    for key, assumed, default, why in arch.assumes:
        value = config.get(key, default)
        if value != assumed and not (isinstance(assumed, list) and not value):
            raise CheckpointError(f"{root}: config.json {key} = {value!r}; {why} ({hf_name} to GGUF needs {assumed!r})")
    arch_name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.arch]]
    w = _Recorder(arch_name)
    name = config.get("_name_or_path") or root.name
    w.add_name(str(name).rstrip("/").rsplit("/", 1)[-1])
    _hparams(w, BASE_HPARAMS, config, root, hf_name)
    freqs = _rope(w, config, root, arch)
    _hparams(w, BASE_HPARAMS_LATE, config, root, hf_name)
    if arch.moe and _find(config, ("num_local_experts", "num_experts")) is None:
        raise CheckpointError(f"{root}: config.json has no num_experts ({hf_name} needs it for GGUF)")
    _hparams(w, arch.hparams, config, root, hf_name)
    if arch.llama_extras:
        if config.get("vocab_size") is None:
            raise CheckpointError(f"{root}: config.json has no vocab_size ({hf_name} needs it for GGUF)")
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    _tokenizer(w, root, config, arch)
    tensors, dropped = _tensors(config, shapes, modules, arch, arch_name, root)
    if freqs is not None:
        tensors.insert(0, GGUFTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (), False,
                                     plain="f32", values=freqs))
    return GGUFModel(arch=arch_name, metadata=w.items(), tensors=tensors, dropped=dropped)
