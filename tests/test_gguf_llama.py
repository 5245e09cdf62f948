"""llama.cpp itself on packq's GGUF files (CI): ggml's own dequantization of every tensor packq wrote equals the
source's exact weights, and the model loads, tokenizes as the source's tokenizer does and evaluates a prompt
with the logits of a float32 reference forward pass of the same weights.

llama.cpp is llama-cpp-py-sync's CPU build (b11739: libggml-base, libggml-cpu, libllama); tests/ggml_lib.py
says how it is loaded on a glibc older than the one it was built against. The model planning is
gguf_model's (the real one here), on a tiny Llama with a tokenizer trained on made-up text.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import gguf_checkpoints as C  # noqa: E402
from ggml_lib import GGML, library_dir  # noqa: E402

from packq.checkpoint import convert_checkpoint  # noqa: E402
from packq.formats import gguf as G  # noqa: E402

PROMPT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    folder = library_dir(tmp_path_factory.mktemp("ggml"))
    if folder is None:
        pytest.skip("llama-cpp-py-sync is not installed (pip install -e '.[test]')")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Llama, GPTQ 4-bit symmetric (Q4_0) and asymmetric (Q5_0), with a tokenizer; their GGUF files."""
    root = tmp_path_factory.mktemp("llama")
    (root / "tok").mkdir()
    vocab = C.add_tokenizer(root / "tok")
    out = {}
    for name, sym in (("sym", True), ("asym", False)):
        truth = C.make_gptq(root / name, bits=4, sym=sym, group=32, vocab=vocab, seed=7)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(root / "tok" / f, root / name / f)
        summary = convert_checkpoint(root / name, root / f"{name}.gguf", to="gguf", verify=True)
        out[name] = (root / name, root / f"{name}.gguf", truth, summary)
    # the same weights as F32: llama.cpp's matmul then quantizes no activations, so its logits are the reference's
    summary = convert_checkpoint(root / "asym", root / "f32.gguf", to="gguf", gguf_type="f32", verify=True)
    out["f32"] = (root / "asym", root / "f32.gguf", out["asym"][2], summary)
    return out


def test_ggml_dequantizes_every_tensor_to_the_source(libs, model):
    from gguf import GGUFReader

    ggml = GGML(libs)
    for name, (src, path, truth, summary) in model.items():
        assert summary["types"] == {{"sym": "Q4_0", "asym": "Q5_0", "f32": "F32"}[name]: 7}
        reader = GGUFReader(path)
        for t in reader.tensors:
            info = G.TYPES[t.tensor_type.name]
            count = int(np.prod([int(x) for x in t.shape]))
            got = ggml.to_float(np.asarray(t.data), info.ggml, info.name, info.weights, info.nbytes, count)
            want = _source_weight(src, truth, t.name)
            assert got.tobytes() == want.reshape(-1).tobytes(), (name, t.name)


def test_ggml_dequantizes_awq_sources_to_the_source(libs, model, tmp_path, monkeypatch):
    """The same weights as AWQ (packq's GPTQ -> AWQ), whose GGUF blocks the one-pass C kernel makes from the words
    as stored (at every level this CPU has: plain, and AVX-512 where it is there): ggml's dequantization of every
    tensor equals the source's exact weights, Q4_0 and Q5_0 as planned and Q8_0 forced."""
    from gguf import GGUFReader

    from packq.backends import numpy as numpy_backend

    ck = numpy_backend.c_kernels()
    if ck is None:
        pytest.skip("packq's C extension is not built here (the one-pass kernel is its)")
    fused = []
    real = numpy_backend.gguf_blocks_awq_fused
    monkeypatch.setattr(numpy_backend, "gguf_blocks_awq_fused",
                        lambda *a, **k: (lambda r: (fused.append(r is not None), r)[1])(real(*a, **k)))
    ggml = GGML(libs)
    try:
        for level in range(ck.transposes(-1) + 1):
            ck.transposes(level)
            for name, gguf_type, want_type in (("sym", "auto", "Q4_0"), ("asym", "auto", "Q5_0"),
                                               ("asym", "q8_0", "Q8_0")):
                src, _, truth, _ = model[name]
                awq = tmp_path / f"{name}-awq"
                if not awq.exists():
                    convert_checkpoint(src, awq, to="awq")
                path = tmp_path / f"{name}-{gguf_type}-{level}.gguf"
                fused.clear()
                summary = convert_checkpoint(awq, path, to="gguf", gguf_type=gguf_type, verify=True)
                assert summary["types"] == {want_type: 7} and fused and all(fused)  # (the one-pass kernel made them)
                for t in GGUFReader(path).tensors:
                    info = G.TYPES[t.tensor_type.name]
                    count = int(np.prod([int(x) for x in t.shape]))
                    got = ggml.to_float(np.asarray(t.data), info.ggml, info.name, info.weights, info.nbytes, count)
                    assert got.tobytes() == _source_weight(src, truth, t.name).reshape(-1).tobytes(), (name, t.name)
    finally:
        ck.transposes(-1)


def _source_weight(src: Path, truth, gguf_name: str) -> np.ndarray:
    """The source's exact weight behind a GGUF tensor, from the fixture's own integers (rows in llama.cpp's order)."""
    from safetensors import safe_open

    inverse = {v: k for k, v in C.LLAMA.items()}
    if gguf_name.startswith("blk."):
        _, layer, kind, _ = gguf_name.split(".")
        hf = inverse[kind]
        prefix = f"model.layers.{layer}.{hf}"
        if prefix in truth:
            q, z, s, g = truth[prefix]
            w = (s[g].astype(np.float32) * (q - z[g]).astype(np.float32)).T
            if hf in ("self_attn.q_proj", "self_attn.k_proj"):
                w = w[list(C.rotary_perm(w.shape[0], C.HEADS))]
            return w
        stored = f"{prefix}.weight"
    else:
        stored = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}[gguf_name]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        import torch

        return f.get_tensor(stored).to(torch.float32).numpy()


def _reference_logits(src: Path, truth, tokens: list[int], bf16_head: bool = False) -> np.ndarray:
    """A float32 Llama forward pass (Hugging Face's rotary, no permutation) on the source's exact weights;
    ``bf16_head``: the last hidden state rounded to bfloat16 before the (bfloat16) output head, as ggml's
    CPU matmul does with a BF16 weight."""
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        import torch

        plain = {k: f.get_tensor(k).to(torch.float32).numpy() for k in f.keys() if k.endswith(".weight")}

    def lin(prefix, x):
        q, z, s, g = truth[prefix]
        return x @ (s[g].astype(np.float32) * (q - z[g]).astype(np.float32))

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w

    x = plain["model.embed_tokens.weight"][tokens]
    n, hd = len(tokens), C.HIDDEN // C.HEADS
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t):  # (heads, n, hd), rotate_half
        half = np.concatenate([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos + half * sin

    for layer in range(C.LAYERS):
        p = f"model.layers.{layer}."
        h = norm(x, plain[p + "input_layernorm.weight"])
        q, k, v = (lin(p + f"self_attn.{m}_proj", h).reshape(n, C.HEADS, hd).transpose(1, 0, 2) for m in "qkv")
        q, k = rope(q), rope(k)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + lin(p + "self_attn.o_proj", (att @ v).transpose(1, 0, 2).reshape(n, -1))
        h = norm(x, plain[p + "post_attention_layernorm.weight"])
        gate = lin(p + "mlp.gate_proj", h)
        x = x + lin(p + "mlp.down_proj", gate / (1 + np.exp(-gate)) * lin(p + "mlp.up_proj", h))
    h = norm(x, plain["model.norm.weight"]).astype(np.float32)
    if bf16_head:
        h = G.dequantize(G.encode_floats(h, "BF16"), "BF16", h.shape)
    return h @ plain["lm_head.weight"].T


def _llama(libs: Path, path: Path):
    import llama_cpp_py_sync._cffi_bindings as bindings

    bindings._find_library = lambda: str(libs / "libllama.so")  # the loadable copy (tests/ggml_lib.py)
    from llama_cpp_py_sync import Llama

    # an F32 KV cache (llama.cpp's default is F16), so that the F32 file's logits can be compared tightly
    return Llama(str(path), n_ctx=64, n_threads=2, verbose=False, type_k="f32", type_v="f32"), bindings.ffi


def _last_logits(llm, ffi, tokens: list[int]) -> np.ndarray:
    llm._eval_tokens(tokens, 0)
    ptr = llm._lib.llama_get_logits_ith(llm._ctx, -1)
    return np.frombuffer(ffi.buffer(ptr, llm.n_vocab * 4), dtype=np.float32).copy()


def test_llama_loads_tokenizes_and_evaluates(libs, model):
    from tokenizers import Tokenizer

    for name, (src, path, truth, _) in model.items():
        llm, ffi = _llama(libs, path)
        try:
            want_ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(PROMPT).ids
            got = llm.tokenize(PROMPT, add_bos=False) if _takes_add_bos(llm) else llm.tokenize(PROMPT)
            assert [t for t in got if t != llm.bos_token] == want_ids, name
            logits = _last_logits(llm, ffi, want_ids)
        finally:
            llm.close()
        ref = _reference_logits(src, truth, want_ids, bf16_head=name == "f32")[-1]
        # ggml's CPU matmul quantizes activations to Q8_0 for Q4_0/Q5_0 weights: logits agree closely, not bit
        # for bit (measured 1.1e-2 and 2.4e-2 of the largest logit; 3.1e-1 with the q/k rows unpermuted, below).
        # With F32 weights (and an F32 KV cache, the bf16 head's input rounded as ggml rounds it) nothing is
        # quantized: 1e-7, llama.cpp's forward pass on packq's exact weights is the reference's
        err = float(np.max(np.abs(logits - ref)) / np.max(np.abs(ref)))
        print(f"{name}: llama.cpp against the float32 reference: {err:.2e} of the largest logit")
        assert np.isfinite(logits).all() and err < (1e-5 if name == "f32" else 0.05), (name, err)
        assert logits.argmax() == ref.argmax(), name


def test_negative_control_unpermuted_rows(libs, model, tmp_path, monkeypatch):
    """The same check fails on a file whose q/k rows were not permuted for llama.cpp's rotary."""
    import packq.checkpoint.gguf_model as gm

    src, _, truth, _ = model["sym"]
    real = gm.describe

    def unpermuted(*a, **k):
        m = real(*a, **k)
        m.tensors = [type(t)(t.name, t.sources, t.quantized, None, t.plain, t.values) for t in m.tensors]
        return m

    monkeypatch.setattr(gm, "describe", unpermuted)
    convert_checkpoint(src, tmp_path / "bad.gguf", to="gguf")
    llm, ffi = _llama(libs, tmp_path / "bad.gguf")
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(PROMPT).ids
        logits = _last_logits(llm, ffi, ids)
    finally:
        llm.close()
    ref = _reference_logits(src, truth, ids)[-1]
    err = float(np.max(np.abs(logits - ref)) / np.max(np.abs(ref)))
    print(f"unpermuted q/k: {err:.2e} of the largest logit")
    assert err > 0.1


def _takes_add_bos(llm) -> bool:
    import inspect

    return "add_bos" in inspect.signature(llm.tokenize).parameters


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2ForCausalLM"])
def test_other_architectures_exact_and_evaluated(libs, tmp_path, arch):
    """A tiny Qwen3-MoE (experts stacked into ffn_*_exps) and Qwen2 (q/k/v biases): every tensor ggml dequantizes is
    the source's (stacked expert by expert, rows permuted where planned), and llama.cpp evaluates a prompt."""
    from gguf import GGUFReader
    from test_gguf_model import tiny
    from tokenizers import Tokenizer

    import packq.checkpoint.gguf_model as gm

    (tmp_path / "tok").mkdir()
    vocab = C.add_tokenizer(tmp_path / "tok")
    config, shapes, modules = tiny(arch, vocab=vocab)
    truth = C.make_from(tmp_path / "src", config, shapes, modules)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / f, tmp_path / "src" / f)
    summary = convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", verify=True, to="gguf")
    assert summary["types"] == {"Q5_0": len(modules) if arch != "Qwen3MoeForCausalLM" else 4 * 2 + 3 * 2}
    model = gm.describe(tmp_path / "src", json.loads((tmp_path / "src" / "config.json").read_text()), shapes, modules)
    planned = {t.name: t for t in model.tensors}
    ggml = GGML(libs)
    reader = GGUFReader(tmp_path / "m.gguf")
    stacked = 0
    for t in reader.tensors:
        info, plan = G.TYPES[t.tensor_type.name], planned[t.name]
        count = int(np.prod([int(x) for x in t.shape]))
        got = ggml.to_float(np.asarray(t.data), info.ggml, info.name, info.weights, info.nbytes, count)
        if plan.quantized:
            ws = []
            for prefix in plan.sources:
                q, z, s, g = truth[prefix]
                w = (s[g].astype(np.float32) * (q - z[g]).astype(np.float32)).T
                ws.append(w if plan.row_perm is None else w[list(plan.row_perm)])
            stacked += len(plan.sources) > 1
            want = np.stack(ws) if len(ws) > 1 else ws[0]
        else:
            with __import__("safetensors").safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
                import torch

                want = np.stack([f.get_tensor(n).to(torch.float32).numpy() for n in plan.sources])
        assert got.tobytes() == want.reshape(-1).tobytes(), t.name
    assert stacked == (6 if arch == "Qwen3MoeForCausalLM" else 0)  # gate, up, down experts of 2 layers
    llm, ffi = _llama(libs, tmp_path / "m.gguf")
    try:
        ids = Tokenizer.from_file(str(tmp_path / "src" / "tokenizer.json")).encode(PROMPT).ids
        logits = _last_logits(llm, ffi, ids)
    finally:
        llm.close()
    assert logits.shape == (vocab,) and np.isfinite(logits).all() and logits.std() > 0


def test_two_sources_of_one_gguf_name_are_refused(tmp_path, capsys):
    """A stray `<module>.weight` beside a quantized module maps to the module's own GGUF name: refused in one
    line naming both, before anything is written (gguf_model's planning; the stand-in elsewhere skips it)."""
    from packq.cli import main

    (tmp_path / "tok").mkdir()
    vocab = C.add_tokenizer(tmp_path / "tok")

    def stray(t):
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((C.HIDDEN, C.HIDDEN), np.uint16)

    C.make_gptq(tmp_path / "src", edit=stray, vocab=vocab)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / f, tmp_path / "src" / f)
    before = sorted(os.listdir(tmp_path))
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "m.gguf"), "--to", "gguf"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "are both GGUF tensor blk.0.attn_q.weight" in err and "model.layers.0.self_attn.q_proj.weight" in err, err
    assert sorted(os.listdir(tmp_path)) == before
