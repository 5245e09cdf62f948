"""The model around a GGUF file's tensors (packq.checkpoint.gguf_model): planning and tokenization.

Every architecture's plan on tiny configs (names, order, stacked experts, the rotary permutation, the
hyperparameters under llama.cpp's keys), the refusals, and the tokenizer: llama.cpp itself (the prebuilt
CPU library of llama-cpp-py-sync) reads the vocabulary packq writes and tokenizes a set of texts exactly
as the source's tokenizer (the ``tokenizers`` package, ``sentencepiece``) does, for BPE tokenizers with
Llama 3's, Qwen2's and GPT-2's pre-tokenizers and for a SentencePiece model, trained here in a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from packq.checkpoint import gguf_model
from packq.checkpoint.gguf_model import describe
from packq.errors import CheckpointError

gguf = pytest.importorskip("gguf")  # the [gguf] extra, in the test extra: present in CI

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines\n",
    "numbers 3 33 333 3333 12345678 3.14159 1,000,000 and 0x1F",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "def f(x):\n    return x ** 2  # comment\n\nprint(f(3))",
    "Ünïcödé: café, naïve, Straße; русский текст; 日本語のテキスト; 我想在apple工作; emoji 🦙🚀😁",
    "<|begin_of_text|>special tokens inside text<|eot_id|> and <think>added</think>",
    "",
    " ",
    gguf_model.CHKTXT,
]
CORPUS = [t for t in TEXTS if t] * 3 + [
    "the rain in spain stays mainly in the plain; " * 5,
    "packq converts quantized checkpoints to llama.cpp exactly, without re-quantizing them. " * 4,
    "Numbers: " + " ".join(str(i * 37) for i in range(200)),
]


# --- tiny checkpoints -------------------------------------------------------------------------------


def tiny(arch: str, *, tied: bool = False, layers: int = 2, hidden: int = 64, heads: int = 4, kv: int = 2,
         experts: int = 4, head_dim: int | None = None, vocab: int = 640, **extra):
    """config.json, plain shapes and quantized modules (K, N) of a tiny checkpoint of ``arch``."""
    hd = head_dim or hidden // heads
    ffn, moe_ffn = 128, 32
    config = {"architectures": [arch], "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": tied, **extra}
    if head_dim:
        config["head_dim"] = head_dim
    moe = arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
    if arch == "MixtralForCausalLM":
        config |= {"num_local_experts": experts, "num_experts_per_tok": 2}
    if arch == "Qwen3MoeForCausalLM":
        config |= {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": moe_ffn,
                   "norm_topk_prob": True}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    modules: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.rotary_emb.inv_freq"] = (hd // 2,)
        modules |= {p + "self_attn.q_proj": (hidden, heads * hd), p + "self_attn.k_proj": (hidden, kv * hd),
                    p + "self_attn.v_proj": (hidden, kv * hd), p + "self_attn.o_proj": (heads * hd, hidden)}
        if arch == "Qwen2ForCausalLM":
            for proj, n in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                shapes[p + f"self_attn.{proj}.bias"] = (n,)
        if arch.startswith("Qwen3"):
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if arch == "MixtralForCausalLM":
            shapes[p + "block_sparse_moe.gate.weight"] = (experts, hidden)
            for e in range(experts):
                q = p + f"block_sparse_moe.experts.{e}."
                modules |= {q + "w1": (hidden, ffn), q + "w3": (hidden, ffn), q + "w2": (ffn, hidden)}
        elif moe:
            shapes[p + "mlp.gate.weight"] = (experts, hidden)
            for e in range(experts):
                q = p + f"mlp.experts.{e}."
                modules |= {q + "gate_proj": (hidden, moe_ffn), q + "up_proj": (hidden, moe_ffn),
                            q + "down_proj": (moe_ffn, hidden)}
        else:
            modules |= {p + "mlp.gate_proj": (hidden, ffn), p + "mlp.up_proj": (hidden, ffn),
                        p + "mlp.down_proj": (ffn, hidden)}
    return config, shapes, modules


def bpe_tokenizer(root: Path, kind: str = "llama3", vocab_size: int = 600) -> Path:
    """A BPE tokenizer.json trained on CORPUS with the pre-tokenizer (and merge rule) of Llama 3, Qwen2 or GPT-2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        regex = gguf_model._LLAMA3_REGEX if kind == "llama3" else gguf_model._QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["<think>", "</think>"])  # added, not special: llama.cpp's USER_DEFINED
    bos = tok.token_to_id("<|begin_of_text|>")
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": kind == "llama3",
        "chat_template": "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|eot_id|>{% endfor %}"}))
    return root


def spm_tokenizer(root: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE tokenizer.model with Llama 2's settings (byte fallback, digits split, a dummy prefix)."""
    import io

    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (root / "tokenizer.model").write_bytes(model.getvalue())
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    # llama.cpp's SpecialVocab finds a SentencePiece model's special ids in config.json, as in a Llama 2 folder
    (root / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return root


def kv(model) -> dict:
    return {k: v for k, v, _ in model.metadata}


# --- planning ---------------------------------------------------------------------------------------

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
         "Qwen3MoeForCausalLM"]
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe"}


@pytest.fixture(scope="module")
def bpe_root(tmp_path_factory) -> Path:
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_is_planned(arch, bpe_root):
    config, shapes, modules = tiny(arch, head_dim=32 if arch.startswith("Qwen3") else None)
    m = describe(bpe_root, config, shapes, modules)
    name = GGUF_ARCH[arch]
    meta = kv(m)
    assert m.arch == name and meta["general.architecture"] == name
    assert meta[f"{name}.block_count"] == 2 and meta[f"{name}.embedding_length"] == 64
    assert meta[f"{name}.attention.head_count"] == 4 and meta[f"{name}.attention.head_count_kv"] == 2
    assert meta[f"{name}.context_length"] == 256 and meta[f"{name}.attention.layer_norm_rms_epsilon"] == 1e-6
    assert meta[f"{name}.rope.freq_base"] == 10000.0
    names = [t.name for t in m.tensors]
    assert names[0] == "token_embd.weight" and names[-2:] == ["output_norm.weight", "output.weight"]
    assert len(names) == len(set(names))
    # every checkpoint tensor is used exactly once or dropped with a reason
    used = [s for t in m.tensors for s in t.sources]
    assert sorted(used + list(m.dropped)) == sorted(list(shapes) + list(modules))
    assert all("inv_freq" in d for d in m.dropped)
    by = {t.name: t for t in m.tensors}
    permuted = name == "llama"
    assert (by["blk.1.attn_q.weight"].row_perm is not None) == permuted
    assert (by["blk.1.attn_k.weight"].row_perm is not None) == permuted
    assert by["blk.0.attn_v.weight"].row_perm is None and by["blk.0.attn_output.weight"].row_perm is None
    assert by["blk.0.attn_norm.weight"].plain == "f32" and by["output_norm.weight"].plain == "f32"
    assert by["token_embd.weight"].plain == "as-stored" and by["blk.0.attn_q.weight"].quantized
    if arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"):
        assert meta[f"{name}.expert_count"] == 4 and meta[f"{name}.expert_used_count"] == 2
        for kind in ("gate", "up", "down"):
            t = by[f"blk.1.ffn_{kind}_exps.weight"]
            assert t.quantized and len(t.sources) == 4
            assert [s.split(".experts.")[1].split(".")[0] for s in t.sources] == ["0", "1", "2", "3"]
        assert by["blk.0.ffn_gate_inp.weight"].plain == "f32"  # the router: F32, as llama.cpp's converter writes it
        assert "blk.0.ffn_gate.weight" not in by
    else:
        assert by["blk.0.ffn_gate.weight"].sources == ("model.layers.0.mlp.gate_proj",)
    if arch == "Qwen3MoeForCausalLM":
        assert meta["qwen3moe.expert_feed_forward_length"] == 32
        assert by["blk.1.ffn_down_exps.weight"].sources[2] == "model.layers.1.mlp.experts.2.down_proj"
    if arch.startswith("Qwen3"):
        assert meta[f"{name}.attention.key_length"] == 32 and meta[f"{name}.attention.value_length"] == 32
        assert by["blk.0.attn_q_norm.weight"].plain == "f32" and "blk.0.attn_k_norm.weight" in by
    else:
        assert f"{name}.attention.key_length" not in meta
    if arch == "Qwen2ForCausalLM":
        assert by["blk.0.attn_q.bias"].plain == "f32" and by["blk.0.attn_q.bias"].row_perm is None
    if name == "llama":
        assert meta["llama.vocab_size"] == 640 and meta["llama.rope.dimension_count"] == 16
    # blocks in order, each block's tensors in gguf-py's order for the architecture
    blocks = [int(n.split(".")[1]) for n in names if n.startswith("blk.")]
    assert blocks == sorted(blocks)


def test_tied_embeddings_write_no_output(bpe_root):
    config, shapes, modules = tiny("Qwen3ForCausalLM", tied=True)
    m = describe(bpe_root, config, shapes, modules)
    assert "output.weight" not in [t.name for t in m.tensors]
    shapes["lm_head.weight"] = (640, 64)  # stored anyway: transformers ties it, so llama.cpp must too
    m = describe(bpe_root, config, shapes, modules)
    assert "output.weight" not in [t.name for t in m.tensors] and "tie" in m.dropped["lm_head.weight"]
    config["tie_word_embeddings"] = False
    del shapes["lm_head.weight"]
    with pytest.raises(CheckpointError, match="no lm_head"):
        describe(bpe_root, config, shapes, modules)


def permute_like_llama_cpp(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (conversion/llama.py), on the rows of any array."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (4, 2, 16), (8, 1, 8), (2, 2, 64)])
def test_rotary_permutation_is_llama_cpps(heads, kv_heads, head_dim, bpe_root):
    config, shapes, modules = tiny("LlamaForCausalLM", hidden=heads * head_dim, heads=heads, kv=kv_heads)
    shapes["model.layers.0.self_attn.q_proj.bias"] = (heads * head_dim,)  # a bias moves with its rows
    m = describe(bpe_root, config, shapes, modules)
    by = {t.name: t for t in m.tensors}
    rng = np.random.default_rng(0)
    for name, rows, n_kv in (("attn_q", heads * head_dim, heads), ("attn_k", kv_heads * head_dim, kv_heads)):
        w = rng.standard_normal((rows, 8))
        perm = np.asarray(by[f"blk.0.{name}.weight"].row_perm)
        np.testing.assert_array_equal(w[perm], permute_like_llama_cpp(w, heads, n_kv))
        assert sorted(perm.tolist()) == list(range(rows))
    assert by["blk.0.attn_q.bias"].row_perm == by["blk.0.attn_q.weight"].row_perm
    # a negative control: the identity is not the permutation
    assert by["blk.0.attn_q.weight"].row_perm != tuple(range(heads * head_dim))


def test_rope_scaling(bpe_root):
    config, shapes, modules = tiny("LlamaForCausalLM", rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    m = describe(bpe_root, config, shapes, modules)
    assert kv(m)["llama.rope.freq_base"] == 500000.0
    t = m.tensors[0]
    assert t.name == "rope_freqs.weight" and t.sources == () and t.plain == "f32" and len(t.values) == 8
    # llama.cpp's generate_extra_tensors, computed with torch in float32 as its converter does
    torch = pytest.importorskip("torch")
    dim, base = 16, 500000.0
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    want = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want.append(1)
        elif wavelen > 8192 / 1.0:
            want.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_array_equal(np.asarray(t.values, np.float32), torch.tensor(want, dtype=torch.float32).numpy())
    # transformers 5 writes rope_parameters instead of rope_theta / rope_scaling
    config, shapes, modules = tiny("Qwen2ForCausalLM")
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 32768}
    meta = kv(describe(bpe_root, config, shapes, modules))
    assert meta["qwen2.rope.freq_base"] == 1000000.0 and meta["qwen2.rope.scaling.type"] == "yarn"
    assert meta["qwen2.rope.scaling.factor"] == 4.0 and meta["qwen2.rope.scaling.original_context_length"] == 32768
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(CheckpointError, match="rope scaling 'dynamic'"):
        describe(bpe_root, config, shapes, modules)
    del config["rope_parameters"]  # no theta at all: the default, written (llama.cpp's default is the same)
    assert kv(describe(bpe_root, config, shapes, modules))["qwen2.rope.freq_base"] == 10000.0


def test_refusals_are_one_line(bpe_root, tmp_path):
    def refused(match, root=bpe_root, **edits):
        config, shapes, modules = tiny(edits.pop("arch", "Qwen3MoeForCausalLM"))
        for key, value in edits.items():
            if key == "shapes":
                value(shapes)
            elif key == "modules":
                value(modules)
            elif value is None:
                config.pop(key, None)
            else:
                config[key] = value
        with pytest.raises(CheckpointError, match=match) as e:
            describe(root, config, shapes, modules)
        assert "\n" not in str(e.value)
        return str(e.value)

    said = refused("Gemma2ForCausalLM has no GGUF conversion", architectures=["Gemma2ForCausalLM"])
    assert all(a in said for a in ARCHS)
    refused("architecture unstated", architectures=None)
    refused("norm_topk_prob = False", norm_topk_prob=False)
    said = refused("norm_topk_prob = False", norm_topk_prob=None)
    assert "renormalizes" in said  # absent: transformers' default (False), not llama.cpp's
    refused("mlp_only_layers", mlp_only_layers=[1])
    refused("no rms_norm_eps", rms_norm_eps=None)
    refused("experts .* config.json says 4", modules=lambda m: m.pop("model.layers.0.mlp.experts.3.up_proj"))
    refused("has no place", shapes=lambda s: s.update({"model.layers.0.mystery.weight": (4,)}))
    refused("no token embedding", shapes=lambda s: s.pop("model.embed_tokens.weight"))
    refused("no tokenizer.json or tokenizer.model", root=tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {}}}))
    refused("a WordLevel tokenizer", root=tmp_path)


def test_unknown_bpe_tokenizer_is_refused_not_default(tmp_path):
    """A pre-tokenizer llama.cpp knows neither by hash nor by structure: refused, never written as 'default'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    config, shapes, modules = tiny("LlamaForCausalLM")
    with pytest.raises(CheckpointError, match="does not recognise this BPE tokenizer"):
        describe(tmp_path, config, shapes, modules)


def test_pre_tokenizer_by_llama_cpps_hash(bpe_root):
    """The hash table decides first (as llama.cpp's converter): a tokenizer whose ids on CHKTXT hash to a known
    entry is named by it, whatever its structure says."""
    import hashlib

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_root / "tokenizer.json"))
    data = json.loads((bpe_root / "tokenizer.json").read_text())
    assert gguf_model.pre_tokenizer(tok, data, bpe_root) == "llama-bpe"  # by structure: not in the table
    digest = hashlib.sha256(str(tok.encode(gguf_model.CHKTXT).ids).encode()).hexdigest()
    assert digest not in gguf_model.PRE_BY_HASH
    gguf_model.PRE_BY_HASH[digest] = "smaug-bpe"
    try:
        assert gguf_model.pre_tokenizer(tok, data, bpe_root) == "smaug-bpe"
    finally:
        del gguf_model.PRE_BY_HASH[digest]
    # entries of llama.cpp's table for the architectures packq converts
    names = set(gguf_model.PRE_BY_HASH.values())
    assert {"llama-bpe", "qwen2", "gpt-2", "smaug-bpe", "tekken"} <= names and len(gguf_model.PRE_BY_HASH) > 90


def test_tokenizer_metadata(bpe_root, tmp_path):
    config, shapes, modules = tiny("LlamaForCausalLM", vocab=700)  # the embedding has rows no token uses
    meta = kv(describe(bpe_root, config, shapes, modules))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(tokens) == len(types) == 700 and tokens[-1] == "[PAD699]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tokens.index("<|eot_id|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED
    assert meta["tokenizer.ggml.bos_token_id"] == tokens.index("<|begin_of_text|>")
    assert meta["tokenizer.ggml.eos_token_id"] == tokens.index("<|eot_id|>")
    assert meta["tokenizer.ggml.add_bos_token"] is True and len(meta["tokenizer.ggml.merges"]) > 100
    assert "messages" in meta["tokenizer.chat_template"]
    config["vocab_size"] = 100  # fewer rows than tokens
    with pytest.raises(CheckpointError, match="beyond config.json's vocab_size 100"):
        describe(bpe_root, config, shapes, modules)
    spm = spm_tokenizer(tmp_path / "spm")
    config, shapes, modules = tiny("MistralForCausalLM", vocab=400)
    meta = kv(describe(spm, config, shapes, modules))
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == 400
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE  # <0x00>, byte fallback


# --- llama.cpp itself tokenizes as the source does -------------------------------------------------


class LlamaCppVocab:
    """A vocabulary-only GGUF loaded in llama.cpp (the libllama that llama-cpp-py-sync bundles)."""

    def __init__(self, path: Path, cache: Path) -> None:
        import sys

        bindings = pytest.importorskip("llama_cpp_py_sync._cffi_bindings")
        sys.path.insert(0, str(Path(__file__).parent))
        from ggml_lib import library_dir  # the wheel's libraries, loadable on glibc 2.36 too

        self.ffi = bindings.get_ffi()  # the wheel's declarations of llama.h
        self.lib = self.ffi.dlopen(str(library_dir(cache) / "libllama.so"))
        self.lib.llama_backend_init()
        params = self.lib.llama_model_default_params()
        params.vocab_only = True
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), params)
        assert self.model != self.ffi.NULL, f"llama.cpp did not load {path}"
        self.vocab = self.lib.llama_model_get_vocab(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        n = len(data) + 16
        out = self.ffi.new(f"llama_token[{n}]")
        got = self.lib.llama_tokenize(self.vocab, data, len(data), out, n, True, True)
        assert got >= 0
        return [out[i] for i in range(got)]

    def close(self) -> None:
        self.lib.llama_model_free(self.model)


@pytest.fixture(scope="module")
def lib_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("libllama")


def write_vocab_gguf(model, path: Path) -> Path:
    """The metadata describe() planned, written by gguf-py with no tensors (llama.cpp's vocab-only files)."""
    w = gguf.GGUFWriter(str(path), model.arch)
    for key, value, vtype in model.metadata:
        if key != "general.architecture":
            sub = gguf.GGUFValueType.get_type(value[0]) if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def hf_ids(root: Path, text: str) -> list[int]:
    if (root / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
        return [sp.bos_id(), *sp.encode(text)]  # Llama's tokenizer: BOS, then SentencePiece
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(root / "tokenizer.json")).encode(text).ids


@pytest.mark.parametrize(("kind", "arch", "pre"), [("llama3", "LlamaForCausalLM", "llama-bpe"),
                                                   ("qwen2", "Qwen3ForCausalLM", "qwen2"),
                                                   ("gpt2", "Qwen2ForCausalLM", "gpt-2"),
                                                   ("spm", "LlamaForCausalLM", "default")])
def test_llama_cpp_tokenizes_as_the_source(kind, arch, pre, tmp_path, lib_cache):
    root = spm_tokenizer(tmp_path / kind) if kind == "spm" else bpe_tokenizer(tmp_path / kind, kind)
    config, shapes, modules = tiny(arch, vocab=1000)
    model = describe(root, config, shapes, modules)
    assert kv(model)["tokenizer.ggml.pre"] == pre
    vocab = LlamaCppVocab(write_vocab_gguf(model, tmp_path / "vocab.gguf"), lib_cache)
    try:
        for text in TEXTS:
            if kind == "spm" and "<" in text:
                continue  # SentencePiece itself does not parse control tokens in text; llama.cpp does
            assert vocab.tokenize(text) == hf_ids(root, text), text
        # a negative control: the same vocabulary with another pre-tokenizer tokenizes some text differently
        if kind != "spm":
            wrong = "gpt-2" if pre != "gpt-2" else "llama-bpe"
            model.metadata = [(k, wrong if k == "tokenizer.ggml.pre" else v, t) for k, v, t in model.metadata]
            other = LlamaCppVocab(write_vocab_gguf(model, tmp_path / "wrong.gguf"), lib_cache)
            try:
                assert any(other.tokenize(t) != hf_ids(root, t) for t in TEXTS)
            finally:
                other.close()
    finally:
        vocab.close()
