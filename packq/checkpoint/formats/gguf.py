"""GGUF (llama.cpp) as a target: which block type holds each quantized module exactly, and its tensors' bytes.

A quantized module becomes one GGUF tensor (ne = [K, N]; stacked MoE experts ne = [K, N, E]) of
the smallest block type that holds every one of its blocks exactly (``auto``: Q4_0, Q5_0 or
Q8_0; :mod:`packq.formats.gguf` says when a block is exact), or of the type asked for, refused
before any write where it is not exact, unless the user accepts the inexact result. Plain tensors
keep their values: norms as F32, the rest as stored. The model around the tensors (architecture,
hyperparameters, tensor names and order, the q/k row permutation, expert stacking, tokenizer)
is planned by :mod:`packq.checkpoint.gguf_model`; the file itself is written by the GGUF container
(:mod:`packq.checkpoint.containers.gguf`). Everything is decided by :func:`plan` before the first
byte is written; the tensors are then made one at a time, a module's in column blocks.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq.backends import numpy as numpy_kernels
from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.formats.base import CheckpointFormat, Piece, fields, module_arrays
from packq.checkpoint.model import Checkpoint, module_array
from packq.checkpoint.safetensors import Buffers, Stored
from packq.core import bits as B
from packq.errors import CheckpointError
from packq.formats import awq
from packq.formats import gguf as G
from packq.formats.engines import FIELD, WORD, read_v1

if TYPE_CHECKING:
    from packq.checkpoint.gguf_model import GGUFModel, GGUFTensor

NAME = "gguf"
#: ``--gguf-type`` choices; auto: the smallest of Q4_0, Q5_0, Q8_0 that holds a tensor exactly
CHOICES = ("auto", "q4_0", "q5_0", "q8_0", "f16", "bf16", "f32")
#: a module is encoded in blocks of output rows of about this many weights (memory: a few bytes each)
COLUMN_WEIGHTS = 1 << 22
#: an AWQ module's census unpacks its codes in blocks of whole groups of rows of about this many bytes
CENSUS_BYTES = 1 << 20
#: qweight is unpacked in blocks of rows of about this many words
ROW_WORDS = 1 << 20
#: a plain tensor kept as stored is read into the writer's stage in parts of this many bytes
STORED_PART = 8 << 20
#: how many tensors a refusal names before "and N more"
SHOWN = 5
#: safetensors dtype of a plain tensor -> the GGUF type that holds it as stored
PLAIN = {"F16": "F16", "BF16": "BF16", "F32": "F32"}
#: general.file_type (llama.cpp's llama_ftype) by the type most of the quantized weights have
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "BF16": 32}


def module_integers(ckpt: Checkpoint, prefix: str, read_word: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A quantized module's integer codes q (..., K, N) uint8, zero-points z (..., G, N) int16 (a GPTQ v1
    source read as its producer wrote it: ``read_word`` for GPTQModel's whole-word convention), scales
    (..., G, N) float16 or float32 (bfloat16 widened, exactly), and its g_idx (None where absent).

    The codes are unpacked in blocks of rows into one byte each, so that memory holds the packed module,
    its bytes and one block's int32 work, not the whole module as int32."""
    m = ckpt.modules[prefix]
    a = module_arrays(ckpt, prefix)
    words = a["qweight"].view(np.int32)
    awq_layout = ckpt.format.method == "awq"
    per, nwords = B.layout(m.bits)
    unit = 1 if awq_layout else nwords  # AWQ rows are K rows; GPTQ's are packed along K, a period of nwords words
    rows = words.shape[-2]
    step = max(unit, ROW_WORDS // max(1, words.shape[-1]) // unit * unit)
    lead = words.shape[:-2]
    flat = words.reshape(-1, *words.shape[-2:])
    q = np.empty((flat.shape[0], m.k, m.n), dtype=np.uint8)
    for e in range(flat.shape[0]):
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if awq_layout:  # unpack_awq's values, one byte each (unpack_awq_u8), in place
                numpy_kernels.unpack_awq_u8(flat[e, r0:r1], out=q[e, r0:r1])
            else:
                q[e, r0 * per // nwords: r1 * per // nwords] = numpy_backend.run(
                    B.unpack, flat[e, r0:r1], direction="row", bits=m.bits)
    q = q.reshape(*lead, m.k, m.n)
    if awq_layout:
        z = np.asarray(numpy_backend.run(awq.unpack_awq, a["qzeros"].view(np.int32))).astype(np.int16)
    else:
        stored = fields(a["qzeros"], m.bits)
        if ckpt.format.checkpoint_format == "gptq_v2":
            z = stored
        else:
            z = read_v1(stored, a["qzeros"].view(np.uint32), WORD if read_word else FIELD, m.bits)
    g_idx = a.get("g_idx")
    return q, z.astype(np.int16), a["scales"], None if g_idx is None else g_idx.astype(np.int32)


def _awq_arrays(ckpt: Checkpoint, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A 2-D 4-bit AWQ module's zero-points (G, N) int16 and scales, for the paths that read its words in place
    (:func:`_awq_words`: a plan that decides from zero-points and scales alone reads none); None for other sources
    (and for groups of rows that GGUF blocks straddle, K not a multiple of 32 or of the groups: those take
    module_integers, whose census names what is wrong), decided from the headers."""
    if not _awq_direct(ckpt, prefix):
        return None
    m = ckpt.modules[prefix]
    z = numpy_kernels.unpack_awq_u8(module_array(ckpt, m, "qzeros").view(np.int32)).astype(np.int16)
    return z, module_array(ckpt, m, "scales", floats=True)


def _awq_direct(ckpt: Checkpoint, prefix: str) -> bool:
    """Whether :func:`_awq_arrays` takes the module (from its headers alone)."""
    m = ckpt.modules[prefix]
    if ckpt.format.method != "awq" or m.lead or m.bits != 4 or m.transposed or "g_idx" in m.names:
        return False
    k, groups = m.infos["qweight"].shape[0], m.infos["scales"].shape[0]
    return bool(groups) and not k % groups and not (k // groups) % G.BLOCK


def _awq_words(ckpt: Checkpoint, prefix: str, buffers: Buffers | None = None) -> np.ndarray:
    """An AWQ module's words (K, N/8) int32 as stored (read into a buffer of ``buffers`` where given)."""
    m = ckpt.modules[prefix]
    with ckpt.shards[m.files["qweight"]].open() as f:
        return f.array(m.names["qweight"], buffers).view(np.int32)


class _Held:
    """A buffer that ``count`` pieces read, made on any threads in any order: given back to ``buffers`` once the
    last of them is made (not before: the pieces made on the other worker may still read it)."""

    def __init__(self, buf: np.ndarray, count: int, buffers: Buffers | None) -> None:
        self.buf, self.left, self.buffers = buf, count, buffers
        self._lock = threading.Lock()

    def run(self, make: Callable[..., np.ndarray], *args: Any, **kw: Any) -> np.ndarray:
        try:
            return make(*args, **kw)
        finally:
            with self._lock:
                self.left -= 1
                last = self.left == 0
            if last and self.buffers is not None:
                self.buffers.give(self.buf)


class _Rows:
    """An AWQ module's words read a block of rows at a time, as they are sliced (``rows[r0:r1]``): a decision
    that stops early reads only what it looked at."""

    def __init__(self, ckpt: Checkpoint, prefix: str) -> None:
        m = ckpt.modules[prefix]
        self.shard, self.name, self.shape = ckpt.shards[m.files["qweight"]], m.names["qweight"], m.infos["qweight"].shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        r0, r1, _ = rows.indices(self.shape[0])
        with self.shard.open() as f:
            return f.rows(self.name, r0, r1).view(np.int32)


def _q4_0_holds(words: np.ndarray | _Rows, z: np.ndarray, s: np.ndarray) -> bool:
    """Whether every block of a 4-bit AWQ module fits Q4_0 (codes less their zero-point in [-8, 7]; its scales
    fp16 values), by the codes' block bounds a group of rows at a time, stopping at the first block that does not."""
    k, groups = words.shape[0], s.shape[0]
    step = max(1, CENSUS_BYTES // max(1, 4 * words.shape[1]) // (k // groups)) * (k // groups)  # whole groups of rows
    for r0 in range(0, k, step):
        r1 = min(k, r0 + step)
        g0, g1 = r0 // (k // groups), r1 // (k // groups)
        part = G.census_of_bounds(*numpy_kernels.awq_code_bounds_words(words[r0:r1]), z[g0:g1], s[g0:g1])
        if not part.holds("Q4_0"):
            return False
    return True


def _full_span(z: np.ndarray, s: np.ndarray, blocks: int) -> G.Census:
    """The census of a module whose every block's codes span [0, 15], ``blocks`` blocks a group: a group's blocks
    share its zero-point and scale, so each (group, column) is counted once and weighs ``blocks`` (the same counts
    as :func:`packq.formats.gguf.census_of_bounds` block by block, a quarter of its work at groups of 128)."""
    if s.dtype == np.float16 and z.size and 0 <= int(z.min()) and int(z.max()) < 16:
        # every scale an fp16 value: a type holds a (group, column) by its zero-point alone, codes 0 - z to 15 - z
        # in its range; so the count of each zero-point decides (the same counts, a tenth of the work)
        per = np.bincount(z.ravel().astype(np.intp), minlength=16)
        exact = {t: int(per[max(0, 15 - G.TYPES[t].hi): min(15, -G.TYPES[t].lo) + 1].sum()) * blocks for t in G.QUANTIZED}
        return G.Census(z.size * blocks, z.size * blocks * G.BLOCK, exact, {"F16": 0, "BF16": 0})
    span = np.zeros(z.shape, np.uint8)
    c = G.census_of_bounds(span, np.full_like(span, 15), z, s)
    return G.Census(c.blocks * blocks, c.weights * blocks, {t: v * blocks for t, v in c.exact.items()}, dict(c.rounded))


def _columns(n: int, k: int) -> list[tuple[int, int]]:
    width = max(32, COLUMN_WEIGHTS // max(k, 1) // 32 * 32)
    return [(n0, min(n, n0 + width)) for n0 in range(0, n, width)]


def module_census(ckpt: Checkpoint, prefix: str, read_word: bool = False, rounding: bool = True,
                  decide: str | None = None, symmetric: dict[str, bool] | None = None) -> G.Census:
    """:func:`packq.formats.gguf.census` of one module, in column blocks (memory: the packed module and one block);
    ``rounding``: count what F16/BF16 rounding changes too (without it those counts are 0).

    ``decide`` ("auto", "Q5_0" or "Q8_0", without ``rounding``): only what a plan of that type decides by need be
    exact. A 4-bit AWQ code less a 4-bit zero-point is always in Q5_0's and Q8_0's ranges, so the census of codes
    spanning [0, 15] counts those two types exactly without reading the words; for "auto" the words are then read
    only until a block that Q4_0 does not hold (the first few rows of a random asymmetric module), and the census
    returned counts Q4_0's exact blocks as at least those of that span (fewer than all: what decides).

    ``symmetric``: where given, the module's entry says whether its zero-points are all 8 (AWQ read in place)."""
    total = G.Census()
    direct = _awq_arrays(ckpt, prefix)
    if direct is not None:  # AWQ: the codes unpacked a few groups of rows at a time, into one reused buffer
        z, s = direct
        k, n = ckpt.modules[prefix].infos["qweight"].shape[0], s.shape[1]
        size = k // s.shape[0]
        z8 = bool(np.all(z == 8))
        if symmetric is not None:
            symmetric[prefix] = z8
        if not rounding and (z8 or decide in ("Q5_0", "Q8_0")):  # symmetric: every q - 8 of a 4-bit
            # code is in [-8, 7], Q4_0's (and the others') range, whatever the codes, so the block ranges need no
            # pass over the words (none are read): the census of codes spanning [0, 15] is the module's (only the
            # scales decide, as for any source); and Q5_0's and Q8_0's counts are exact for any zero-points
            return _full_span(z, s, size // G.BLOCK)
        if not rounding and decide == "auto":
            worst = _full_span(z, s, size // G.BLOCK)
            if worst.holds("Q5_0") and not _q4_0_holds(_Rows(ckpt, prefix), z, s):  # (the words it looks at only)
                return worst  # Q4_0 does not hold: the plan takes Q5_0, whose count is exact
            # else the whole census: Q4_0 may hold, or no type does (the refusal names the best one's count)
        words = _awq_words(ckpt, prefix)
        rows = max(size, CENSUS_BYTES // n // size * size)
        buf = np.empty((min(rows, k), n), np.uint8)
        hist = numpy_kernels.awq_histogram_t(words, s.shape[0]) if rounding else None
        # without the roundings, NumPy's byte reductions (6x the kernel, and no numba to load); with them the
        # histogram has loaded the kernels anyway
        bounds = numpy_kernels.awq_code_bounds_t(words) if rounding else numpy_kernels.awq_code_bounds_words(words)
        if bounds is not None and (hist is not None or not rounding):  # the kernels: one pass over the words each
            total = G.census_of_bounds(*bounds, z, s)
            if hist is not None:  # and the largest errors, which a plan that rounds then reads from here
                total.rounded, total.max_error = G.rounding_by_histogram(z, s, hist)
            return total
        try:
            for r0 in range(0, k, rows):
                r1 = min(k, r0 + rows)
                q = numpy_kernels.unpack_awq_u8(words[r0:r1], out=buf[: r1 - r0])
                total += G.census(q, z[r0 // size: r1 // size], s[r0 // size: r1 // size],
                                  rounding=rounding and hist is None)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.root}: {prefix}: {err}") from None
        if hist is not None:  # the roundings from each (group, column)'s 16 products, weighted by their codes' counts
            total.rounded, total.max_error = G.rounding_by_histogram(z, s, hist)
        return total
    q, z, s, g = module_integers(ckpt, prefix, read_word)
    q, z, s = (x.reshape(-1, *x.shape[-2:]) for x in (q, z, s))
    try:
        for e in range(q.shape[0]):
            for n0, n1 in _columns(q.shape[-1], q.shape[-2]):
                total += G.census(q[e, :, n0:n1], z[e, :, n0:n1], s[e, :, n0:n1], g, rounding=rounding)
    except ValueError as err:  # K not a multiple of 32, g_idx out of range: the module has no GGUF block form
        raise CheckpointError(f"{ckpt.root}: {prefix}: {err}") from None
    return total


@dataclass
class Planned:
    """One tensor of the GGUF file, decided before writing: its type, shape and what it is made of."""

    name: str
    gguf_type: str  #: "Q4_0", "Q5_0", "Q8_0", "F16", "BF16" or "F32"
    shape: tuple[int, ...]  #: NumPy order, the row (ne[0]) last: (N, K), (E, N, K), or a plain tensor's shape
    tensor: GGUFTensor
    census: G.Census | None = None  #: quantized tensors
    exact: bool = True  #: dequantizes to the source's exact weights (plain tensors: their stored values)
    max_error: float = 0.0  #: the largest |weight| difference where not exact
    stored: str | None = None  #: plain tensors: the safetensors dtype

    @property
    def nbytes(self) -> int:
        t = G.TYPES[self.gguf_type]
        return int(np.prod(self.shape)) // t.weights * t.nbytes


@dataclass
class Plan:
    """The whole file: the model's metadata and every tensor, and what the summary reports."""

    model: GGUFModel
    tensors: list[Planned]
    requested: str
    inexact: list[Planned] = field(default_factory=list)
    #: AWQ modules read in place: whether their zero-points are all 8 (as the census read them: the writer's
    #: choice of kernels need not read them again)
    symmetric: dict[str, bool] = field(default_factory=dict)

    @property
    def file_type(self) -> int:
        weights: dict[str, int] = {}
        for p in self.tensors:
            if p.census is not None:
                weights[p.gguf_type] = weights.get(p.gguf_type, 0) + p.census.weights
        return FILE_TYPE[max(weights, key=lambda t: weights[t])] if weights else 0

    def types(self) -> dict[str, int]:
        """Quantized tensors per GGUF type."""
        out: dict[str, int] = {}
        for p in self.tensors:
            if p.census is not None:
                out[p.gguf_type] = out.get(p.gguf_type, 0) + 1
        return out


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def plan(ckpt: Checkpoint, model: GGUFModel, gguf_type: str, allow_inexact: bool, read_word: bool) -> Plan:
    """Decide every tensor's type from the module censuses; refuse (CheckpointError) before any write where the
    requested type, or every block type, does not hold a tensor exactly and ``allow_inexact`` is not given."""
    if gguf_type not in CHOICES:
        raise CheckpointError(f"--gguf-type must be one of {', '.join(CHOICES)}, got {gguf_type!r}")
    forced = None if gguf_type == "auto" else gguf_type.upper()
    where = {t.name: (f, t) for f, shard in ckpt.shards.items() for t in shard.tensors.values()}
    planned: list[Planned] = []
    refused: list[str] = []
    symmetric: dict[str, bool] = {}
    for t in model.tensors:
        if t.values is not None:  # computed from config.json (Llama 3.1's rope_freqs)
            planned.append(Planned(t.name, "F32", (len(t.values),), t))
            continue
        if not t.quantized:
            planned.append(_plain(ckpt, where, t))
            continue
        mods = [ckpt.modules[p] for p in t.sources]
        if len({(m.k, m.n, m.lead) for m in mods}) != 1:
            raise CheckpointError(f"{ckpt.root}: {t.name}: the experts {_names(list(t.sources))} differ in shape")
        m = mods[0]
        shape = (len(mods), *m.lead, m.n, m.k) if len(mods) > 1 else (*m.lead, m.n, m.k)
        census = G.Census()
        for prefix in t.sources:  # the float roundings only where asked for: they cost more than the block ranges
            census += module_census(ckpt, prefix, read_word, rounding=forced in ("F16", "BF16"),
                                    decide=forced if forced in ("Q5_0", "Q8_0") else "auto" if forced is None else None,
                                    symmetric=symmetric)
        chosen = forced or census.smallest()
        if chosen is None:  # no block type holds it: F16, what AWQ/GPTQ engines compute, if the user accepts that
            p = Planned(t.name, "F16", shape, t, census, exact=False)
            refused.append(f"{t.name} ({_best(census)})")
        else:
            p = Planned(t.name, chosen, shape, t, census, exact=census.holds(chosen))
            if not p.exact:
                refused.append(f"{t.name} ({census.not_exact(chosen)} of "
                               f"{census.blocks if G.TYPES[chosen].quantized else census.weights} "
                               f"{'blocks' if G.TYPES[chosen].quantized else 'weights'} not exact)")
        planned.append(p)
    inexact = [p for p in planned if not p.exact]
    if inexact and not allow_inexact:
        quantized = sum(1 for p in planned if p.census is not None)
        if forced:
            what = (f"GGUF {forced} does not hold {len(inexact)} of {quantized} quantized tensors exactly")
            why = ("F16 and BF16 round (q - z) * s once, as AWQ/GPTQ engines compute it in float16; "
                   if forced in ("F16", "BF16") else "")
        else:
            what = f"no GGUF block type (Q4_0, Q5_0, Q8_0) holds {len(inexact)} of {quantized} quantized tensors exactly"
            why = ("a block of 32 input features needs one fp16 scale: act-order, groups smaller than 32 or scales that "
                   "are not fp16 values have none; ")
        raise CheckpointError(
            f"{ckpt.root}: {what}: {_names(refused)}; {why}pass --gguf-type f32 for the exact product (32 bits a weight), "
            f"or --allow-inexact to write {forced or 'F16 (what AWQ/GPTQ engines compute)'} anyway"
        )
    for p in inexact:
        p.max_error = _max_error(ckpt, p, read_word)
    return Plan(model, planned, gguf_type, inexact, symmetric)


def _best(c: G.Census) -> str:
    t = max(G.QUANTIZED, key=lambda t: c.exact[t])
    if not c.exact[t]:
        return f"none of {c.blocks} blocks exact"
    return f"at most {c.exact[t]} of {c.blocks} blocks exact, in {t}"


def _plain(ckpt: Checkpoint, where: dict[str, Any], t: GGUFTensor) -> Planned:
    infos = []
    for name in t.sources:
        if name not in where:
            raise CheckpointError(f"{ckpt.root}: {t.name}: no tensor {name!r} in the checkpoint")
        infos.append(where[name][1])
    dtypes = {i.dtype for i in infos}
    if len(dtypes) != 1 or len({i.shape for i in infos}) != 1:
        raise CheckpointError(f"{ckpt.root}: {t.name}: the tensors {_names(list(t.sources))} differ in dtype or shape")
    stored = infos[0].dtype
    if stored not in PLAIN:
        raise CheckpointError(f"{ckpt.root}: {t.sources[0]} has dtype {stored}; GGUF plain tensors here are F16, BF16 or F32")
    shape = (len(infos), *infos[0].shape) if len(infos) > 1 else infos[0].shape
    if not shape:
        shape = (1,)
    gguf_type = "F32" if t.plain == "f32" else PLAIN[stored]
    return Planned(t.name, gguf_type, tuple(shape), t, stored=stored)


# ---------------------------------------------------------------- making the bytes
def _module_rows(ckpt: Checkpoint, prefix: str, perm: tuple[int, ...] | None, read_word: bool):
    q, z, s, g = module_integers(ckpt, prefix, read_word)
    if perm is not None:  # whole output rows move, with their scales and zero-points
        idx = np.asarray(perm)
        q, z, s = q[..., idx], z[..., idx], s[..., idx]
    return q.reshape(-1, *q.shape[-2:]), z.reshape(-1, *z.shape[-2:]), s.reshape(-1, *s.shape[-2:]), g


def chunks(ckpt: Checkpoint, p: Planned, read_word: bool, buffers: Buffers | None = None
           ) -> Iterator[np.ndarray | Piece | Stored]:
    """The tensor's data in file order, in pieces: uint8 arrays, :class:`~packq.checkpoint.formats.base.Piece`s whose
    ``make`` makes them (a module's column blocks, expert by expert, which the writer runs on worker threads, a few
    ahead, in order, each at the phase of its place in the file), or a plain tensor's stored bytes as they are
    (:class:`~packq.checkpoint.safetensors.Stored`, which the writer reads into its stage).

    A piece may be (a view of) a buffer taken from ``buffers``, which the writer gives back once the piece is
    written: so no piece may view a buffer that a later piece still reads."""
    t = p.tensor
    if t.values is not None:
        yield np.asarray(t.values, dtype="<f4").view(np.uint8)
        return
    if t.quantized:
        for prefix in t.sources:
            direct = _awq_arrays(ckpt, prefix)
            if direct is not None:  # AWQ words read in place by the kernels, whole rows moved by the permutation
                z, s = direct
                # into a reused buffer, given back once every piece of the module is made: fresh memory is zeroed by
                # the kernel on first touch (a sixth of a Q5_0 conversion's CPU, by perf, 2026-12-02)
                words = _awq_words(ckpt, prefix, buffers)
                k, n = words.shape[0], s.shape[1]
                order = np.arange(n) if t.row_perm is None else np.asarray(t.row_perm)
                g = np.arange(k, dtype=np.int32) // (k // s.shape[0])
                blocks = _columns(n, k)
                held = _Held(words, len(blocks), buffers)
                for n0, n1 in blocks:  # (each says its size: the writer has it made for its place in the file)
                    yield Piece((n1 - n0) * G.row_bytes(p.gguf_type, k),
                                make=functools.partial(held.run, _awq_piece, words, order[n0:n1], z, s, g, p.gguf_type,
                                                       buffers=buffers))
                continue
            q, z, s, g = _module_rows(ckpt, prefix, t.row_perm, read_word)
            for e in range(q.shape[0]):
                for n0, n1 in _columns(q.shape[-1], q.shape[-2]):
                    yield Piece((n1 - n0) * G.row_bytes(p.gguf_type, q.shape[-2]),
                                make=functools.partial(encode, q[e, :, n0:n1], z[e, :, n0:n1], s[e, :, n0:n1],
                                                       p.gguf_type, g))
            del q, z, s
        return
    for name in t.sources:
        shard = next(s for s in ckpt.shards.values() if name in s.tensors)
        if t.row_perm is None and (p.gguf_type != "F32" or p.stored == "F32"):  # its stored bytes, as they are
            # read by the writer straight into its stage (no buffer of its own), a part at a time: the writer makes
            # the pieces after them meanwhile, so an embedding's 65 MB read no longer leaves the workers idle
            yield from Stored(shard, name).parts(STORED_PART)
        else:
            yield _plain_bytes(ckpt, name, p, buffers)


def _by_words(ckpt: Checkpoint, p: Planned, prefix: str, symmetric: dict[str, bool] | None = None) -> bool:
    """Whether :func:`chunks` makes every piece of this module by the whole-word path (no numba kernel): a 2-D 4-bit
    AWQ module, pieces of whole words (the row permutation moving rows within them), Q5_0 or Q8_0, or Q4_0 of zero-points
    that are all 8 (:func:`packq.backends.numpy.gguf_blocks_awq_words`)."""
    if not _awq_direct(ckpt, prefix) or p.gguf_type not in numpy_kernels.GGUF_KINDS:
        return False
    if p.gguf_type == "Q4_0" and not (symmetric[prefix] if symmetric and prefix in symmetric
                                      else np.all(_awq_arrays(ckpt, prefix)[0] == 8)):  # type: ignore[index]
        return False  # (only Q4_0 reads the zero-points: Q5_0 and Q8_0 take any)
    m = ckpt.modules[prefix]
    k, n = m.infos["qweight"].shape[0], m.n
    order = np.arange(n) if p.tensor.row_perm is None else np.asarray(p.tensor.row_perm)
    return all(_whole_words(order[n0:n1]) for n0, n1 in _columns(n, k))


def _whole_words(cols: np.ndarray) -> tuple[int, int] | None:
    """(c0, c1) where source columns ``cols`` are whole AWQ words' columns c0 <= c < c1, permuted within; else None."""
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    return (c0, c1) if c1 - c0 == cols.size and c0 % 8 == 0 and c1 % 8 == 0 else None


def needs_kernels(ckpt: Checkpoint, gplan: Plan) -> bool:
    """Whether some quantized tensor of the plan is made by numba's block kernels (so that ``packq convert`` loads
    them on a thread while it writes; 0.5-1 s of CPU on 2 cores, wasted where the whole-word path makes every block)."""
    return any(not _by_words(ckpt, p, prefix, gplan.symmetric) for p in gplan.tensors if p.tensor.quantized
               for prefix in p.tensor.sources)


def encode(q: np.ndarray, z: np.ndarray, s: np.ndarray, gguf_type: str, g: np.ndarray | None) -> np.ndarray:
    """:func:`packq.formats.gguf.encode` of one column block, by the NumPy backend's compiled block kernel where it
    applies (numba loaded, a quantized type): the same bytes (tests/test_gguf_fast.py), in one pass."""
    if G.TYPES[gguf_type].quantized and q.ndim == 2:
        g_idx = G._check(q, z, s, g)
        fast = numpy_kernels.gguf_blocks_t(q, z, g_idx, G.block_scales(s, g_idx), gguf_type)
        if fast is not None:
            return fast
    return G.encode(q, z, s, gguf_type, g)


def _awq_piece(words: np.ndarray, cols: np.ndarray, z: np.ndarray, s: np.ndarray, g: np.ndarray, gguf_type: str,
               buffers: Buffers | None = None) -> np.ndarray:
    """The GGUF rows of source columns ``cols`` of an AWQ module: the block kernel on the words in place, else
    :func:`packq.formats.gguf.encode` of those columns' codes (the same bytes). ``buffers``: where the piece's
    memory may come from (the writer gives it back once written; see :func:`chunks`)."""
    whole = _whole_words(cols)
    c0, c1 = whole or (0, 0)
    if G.TYPES[gguf_type].quantized and whole:  # one C kernel on the words, zero-points and scales as stored
        out = None if buffers is None else buffers.output(cols.size * G.row_bytes(gguf_type, words.shape[0]))
        fast = numpy_kernels.gguf_blocks_awq_fused(words, c0 // 8, c1 // 8, cols, z, s, gguf_type, out)
        if fast is not None:
            return fast
        if buffers is not None and out is not None:
            buffers.give(out)
    zc, sc = z[:, cols], s[:, cols]
    if G.TYPES[gguf_type].quantized:
        if whole:  # the whole-word bit operations (no numba to load), into a reused buffer
            out = None if buffers is None else buffers.output(cols.size * G.row_bytes(gguf_type, words.shape[0]))
            fast = numpy_kernels.gguf_blocks_awq_words(words, c0 // 8, c1 // 8, cols, z, G.block_scales(sc, g),
                                                       gguf_type, out)
            if fast is not None:
                return fast
            if buffers is not None and out is not None:
                buffers.give(out)
            rowof = np.empty(cols.size, np.int64)  # else the kernel, each word read once
            rowof[cols - c0] = np.arange(cols.size)
            fast = numpy_kernels.gguf_blocks_awq_rows_t(words[:, c0 // 8: c1 // 8], rowof, z[:, c0:c1],
                                                        G.block_scales(sc, g), gguf_type)
        else:
            fast = numpy_kernels.gguf_blocks_awq_t(words, cols, z, G.block_scales(sc, g), gguf_type)
        if fast is not None:
            return fast
    else:  # the float kernel writes whole words' columns
        if whole:
            fast = numpy_kernels.gguf_floats_awq_t(words[:, c0 // 8: c1 // 8], z[:, c0:c1], s[:, c0:c1], gguf_type)
            if fast is not None:
                return fast if np.array_equal(cols, np.arange(c0, c1)) else fast[cols - c0]
    lo, hi = int(cols.min()) // 8, int(cols.max()) // 8 + 1  # the word columns these columns are in
    q = numpy_kernels.unpack_awq_u8(words[:, lo:hi])[:, cols - 8 * lo]
    return G.encode(q, zc, sc, gguf_type, g)


def _plain_values(ckpt: Checkpoint, name: str, p: Planned, buffers: Buffers | None = None) -> np.ndarray:
    """A plain tensor's stored values (bfloat16 as its uint16 bits), rows permuted where planned; read into a buffer
    of ``buffers`` when given (given back here where the permutation copied the rows)."""
    shard = next(s for s in ckpt.shards.values() if name in s.tensors)
    with shard.open() as f:
        a = f.array_bits(name, buffers) if p.stored == "BF16" else f.array(name, buffers)
    if p.tensor.row_perm is not None:
        read, a = a, a[np.asarray(p.tensor.row_perm)]
        if buffers is not None:
            buffers.give(read)
    return a


def _plain_bytes(ckpt: Checkpoint, name: str, p: Planned, buffers: Buffers | None = None) -> np.ndarray:
    """A plain tensor's bytes in the file: its stored values (a buffer of ``buffers`` where they are kept as stored,
    which the writer gives back), or those widened to float32."""
    a = _plain_values(ckpt, name, p, buffers)
    if p.gguf_type == "F32":  # norms as llama.cpp wants them; bfloat16 and float16 widen exactly
        read = a
        a = (a.astype(np.uint32) << 16).view(np.float32) if p.stored == "BF16" else a.astype(np.float32)
        a = a.astype("<f4")
        if buffers is not None:
            buffers.give(read)
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _expected(ckpt: Checkpoint, p: Planned, read_word: bool) -> Iterator[np.ndarray]:
    """What the tensor must dequantize to, in file order: the exact product (the intended rounding where the user
    accepted an inexact tensor), or the plain tensor's values as float32."""
    t = p.tensor
    if t.values is not None:
        yield np.asarray(t.values, dtype=np.float32)
        return
    if not t.quantized:
        for name in t.sources:
            a = _plain_values(ckpt, name, p).reshape(-1)
            for i in range(0, a.size, COLUMN_WEIGHTS):  # in pieces: an embedding's float32 copy is not small
                part = a[i: i + COLUMN_WEIGHTS]
                yield (part.astype(np.uint32) << np.uint32(16)).view(np.float32) if p.stored == "BF16" else part.astype(np.float32)
        return
    for prefix in t.sources:
        q, z, s, g = _module_rows(ckpt, prefix, t.row_perm, read_word)
        for e in range(q.shape[0]):
            for n0, n1 in _columns(q.shape[-1], q.shape[-2]):
                args = (q[e, :, n0:n1], z[e, :, n0:n1], s[e, :, n0:n1])
                w = G.product(*args, g)
                if not p.exact:
                    w = G.dequantize(G.encode(*args, p.gguf_type, g), p.gguf_type, w.shape)
                yield w.reshape(-1)


def _max_error(ckpt: Checkpoint, p: Planned, read_word: bool) -> float:
    if p.census is not None and p.census.max_error is not None and p.gguf_type in p.census.max_error:
        return p.census.max_error[p.gguf_type]  # found by the census already (from the same products)
    worst = 0.0
    t = p.tensor
    for prefix in t.sources:
        direct = _awq_arrays(ckpt, prefix) if p.gguf_type in ("F16", "BF16") else None
        hist = None if direct is None else numpy_kernels.awq_histogram_t(_awq_words(ckpt, prefix), direct[1].shape[0])
        if direct is not None and hist is not None:  # from each (group, column)'s 16 products, those present
            worst = max(worst, G.rounding_by_histogram(direct[0], direct[1], hist)[1][p.gguf_type])
            continue
        q, z, s, g = _module_rows(ckpt, prefix, None, read_word)
        for e in range(q.shape[0]):
            for n0, n1 in _columns(q.shape[-1], q.shape[-2]):
                args = (q[e, :, n0:n1], z[e, :, n0:n1], s[e, :, n0:n1])
                w = G.product(*args, g)
                got = G.dequantize(G.encode(*args, p.gguf_type, g), p.gguf_type, w.shape)
                with np.errstate(invalid="ignore"):
                    worst = max(worst, float(np.nanmax(np.abs(got.astype(np.float64) - w.astype(np.float64)))))
    return worst


def verify(ckpt: Checkpoint, gplan: Plan, path: Path, read_word: bool, check_each=None) -> None:
    """Read the written file back and dequantize every tensor as ggml does (:func:`packq.formats.gguf.dequantize`):
    bit for bit the source's exact weights (plain tensors: their values); names, types and shapes as planned,
    as gguf-py's GGUFReader reads the file. CheckpointError on the first difference.

    ``check_each(check)`` calls ``check(prefix)`` for every quantized module (the conversion's progress): a
    tensor is checked with the first module it holds. The data are read by positioned reads, a piece at a time.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        found = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), int(t.data_offset)) for t in reader.tensors}
        names = [t.name for t in reader.tensors]
        del reader  # its memory map: the data are read piece by piece below
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the file is not what was planned
        raise CheckpointError(f"verification failed: {path}: gguf-py cannot read it back: {e}") from None
    if names != [p.name for p in gplan.tensors]:
        raise CheckpointError(f"verification failed: {path}: its tensors are not the planned ones")
    fd = os.open(path, os.O_RDONLY)
    try:
        def one(p: Planned) -> None:
            kind, ne, offset = found[p.name]
            if G.BY_GGML.get(int(kind)) is not G.TYPES[p.gguf_type] or ne != tuple(reversed(p.shape)):
                raise CheckpointError(f"verification failed: {p.name} is {kind.name} {ne} in the file, "
                                      f"planned {p.gguf_type} {tuple(reversed(p.shape))}")
            t, done = G.TYPES[p.gguf_type], 0
            for want in _expected(ckpt, p, read_word):
                nbytes = want.size // t.weights * t.nbytes
                got = G.dequantize(_pread(fd, nbytes, offset), p.gguf_type, (want.size,))
                if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):  # bit for bit
                    raise CheckpointError(f"verification failed: {p.name} does not dequantize to the source's weights")
                offset, done = offset + nbytes, done + want.size
            if done != int(np.prod(p.shape)):
                raise CheckpointError(f"verification failed: {p.name} holds {int(np.prod(p.shape))} weights, the source {done}")

        by_module = {p.tensor.sources[0]: p for p in gplan.tensors if p.tensor.quantized}
        for p in gplan.tensors:
            if not p.tensor.quantized:
                one(p)
        checked: set[str] = set()

        def check(prefix: str) -> None:
            if prefix in by_module:
                one(by_module[prefix])
                checked.add(prefix)

        if check_each is None:
            for prefix in ckpt.modules:
                check(prefix)
        else:
            check_each(check)
        if checked != set(by_module):
            raise CheckpointError(f"verification failed: {len(set(by_module) - checked)} tensors were not checked")
    finally:
        os.close(fd)


def _pread(fd: int, n: int, offset: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint8)
    view, done = memoryview(out), 0  # type: ignore[arg-type]
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise CheckpointError("verification failed: the GGUF file ends early")
        done += got
    return out


class GGUF(CheckpointFormat):
    """The registry's entry for ``--to gguf``: written by the GGUF container, never read (yet)."""

    name = NAME
    title = "GGUF (llama.cpp: Q4_0 / Q5_0 / Q8_0, exact)"
    recognised_by = "a .gguf file"
    module = "one tensor of GGUF blocks, ne = [K, N] (experts stacked: [K, N, E])"
    read = False
    act_order = True  # as F32 (the exact product); block types refuse it, tensor by tensor, in plan()
    container = "gguf"  # packq.checkpoint.containers.gguf: one file


FORMAT = GGUF()
