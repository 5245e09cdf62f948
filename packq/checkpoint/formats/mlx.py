"""MLX affine, as mlx-lm loads it: per module ``weight`` uint32 (N, K*b/32), ``scales`` and ``biases`` (N, K/G).

The weight is GPTQ's qweight transposed, bit for bit (compressed-tensors' weight_packed as it is; AWQ's
interleave undone first); biases are -s * z. Exact by default: float32 scales and biases, in which
s * z and s * q are exact for float16 and bfloat16 scales, so every MLX backend computes (q - z) * s
exactly. ``--mlx-scales float16|bfloat16`` writes MLX's faster form, where MLX's arithmetic rounds:
packq counts, per backend, the weights that then differ from the source's (``packq.formats.mlx``).

config.json gets ``"quantization": {"group_size", "bits", "mode": "affine"}`` and loses the Hugging
Face ``quantization_config``, without which mlx-lm does not take its own (lossy) AWQ/GPTQ path.
Tensors keep their Hugging Face names, which is what mlx-lm's models read; mixture-of-experts
families whose ``sanitize`` stacks quantized experts themselves (MOE_FAMILIES) keep one module per
expert, others are refused.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq.backends import numpy as numpy_kernels
from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.formats.base import CheckpointFormat, Output, Piece, dequantize, module_arrays
from packq.checkpoint.formats.compressed_tensors import awq_weight_pieces
from packq.checkpoint.formats.gptq import source_zero_points
from packq.checkpoint.model import Module, module_array
from packq.checkpoint.safetensors import Reader, SafetensorsFile
from packq.core import bits as B
from packq.errors import CheckpointError
from packq.formats import awq
from packq.formats import mlx as M

if TYPE_CHECKING:
    from packq.checkpoint.job import Job

NAME = "mlx"
#: --mlx-scales -> the safetensors dtype written
STORED = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
SOURCE_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
#: mixture-of-experts model types whose mlx-lm ``sanitize`` stacks per-expert ``weight``, ``scales`` and ``biases``
#: into its ``switch_mlp`` (read in mlx-lm 0.32.2's models/*.py; mixtral loaded in tests/test_mlx_real.py). Others
#: (qwen3_moe among them) stack only float weights, so their quantized experts must arrive stacked.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
#: mlx-lm reads the weights of ``model*.safetensors`` only
SHARDS = "model*.safetensors"
#: the weights MLX computes are counted in blocks of about this many elements
BLOCK = 1 << 22
SHOWN = 5


def form_note(dtype: str, source: str) -> str:
    """In a few words, where the form ``dtype`` (scales and biases) of ``source`` scales is exact and what it costs."""
    if dtype == "float32" and source != "float32":
        return ("exact on every MLX backend (s * z and s * q are exact in float32). At run time these layers compute "
                "in float32, and their scales and biases take 64/G bits per weight instead of 32/G (4.5 bits per "
                "weight at 4-bit group 128, not 4.25); measured on an x86 CPU, mlx's float32 matmul was 30-60x "
                "faster than its float16 one (docs/mlx.md); on Metal float16 moves half the activation bytes")
    if dtype == "float32":
        return "float32 source scales: MLX rounds s * q and s * z in float32, as the source's engines do not"
    return (f"{dtype}: MLX's CPU rounds s * q before adding the bias; Metal computes s * q + b in float32 and rounds "
            "once, exact wherever -s * z is exact in that dtype (symmetric sources: z = 2**(bits-1))")


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


class MLX(CheckpointFormat):
    name = NAME
    title = "MLX affine (mlx-lm)"
    recognised_by = 'config.json "quantization": {"group_size", "bits", "mode": "affine"} (written, not read)'
    module = "weight (N, K*b/32) uint32, scales (N, K/G), biases (N, K/G)"
    read = False
    act_order = False
    why_not_act_order = "MLX's affine mode groups consecutive input features and has no g_idx"

    # ------------------------------------------------------------ before writing
    def prepare(self, job: Job) -> None:
        """Refuse what MLX cannot hold, then decide the scales' dtype and count, per backend, the weights MLX
        would compute differently from the source's (all before anything is written)."""
        ckpt, fmt = job.ckpt, job.ckpt.format
        if fmt.group_size not in M.GROUP_SIZES:
            got = "-1 (one group over all input features, per-channel)" if fmt.group_size == -1 else str(fmt.group_size)
            raise CheckpointError(f"{ckpt.root}: group size {got}: MLX's affine mode has group sizes "
                                  f"{', '.join(map(str, M.GROUP_SIZES))} only")
        stacked = next((p for p, m in ckpt.modules.items() if m.lead), None)
        if stacked is not None:
            raise CheckpointError(f"{ckpt.root}: {stacked} stores experts stacked in one tensor "
                                  f"{ckpt.modules[stacked].infos['qweight'].shape}; packq writes MLX modules one per "
                                  "expert, as Hugging Face checkpoints store them")
        model_type = str(ckpt.config.get("model_type", ""))
        experts = [p for p in ckpt.modules if ".experts." in p]
        if experts and model_type not in MOE_FAMILIES:
            raise CheckpointError(
                f"{ckpt.root}: model_type {model_type!r} has quantized experts ({experts[0]}, ...), which mlx-lm's "
                f"sanitize for it does not stack (it stacks float weights only); packq writes quantized experts for "
                f"{', '.join(MOE_FAMILIES)}, whose sanitize stacks them")
        odd = [f for f in ckpt.shards if not fnmatch.fnmatch(f, SHARDS)]
        if odd:
            raise CheckpointError(f"{ckpt.root}: shard {odd[0]} is not named {SHARDS}, the only files mlx-lm's loader "
                                  "reads; rename the shards (and the index's weight_map)")
        dtype = job.options.get("mlx_scales") or "float32"
        if dtype not in STORED:
            raise CheckpointError(f"mlx_scales must be float32, float16 or bfloat16, got {dtype!r}")
        sources = {SOURCE_DTYPES[m.infos["scales"].dtype] for m in ckpt.modules.values()}
        if len(sources) != 1:
            raise CheckpointError(f"{ckpt.root}: scales of several dtypes ({', '.join(sorted(sources))}); packq writes "
                                  "one MLX form for all modules")
        source = sources.pop()
        plan: dict[str, Any] = {"scales": dtype, "source_dtype": source, "modules": {},
                                "weights": sum(math.prod(m.lead) * m.n * m.k for m in ckpt.modules.values())}
        # float32 from float16/bfloat16 scales is exact by construction wherever the products stay finite: only
        # modules with non-finite or huge scales (a corrupt source) are counted then; every module otherwise
        count = [p for p, m in ckpt.modules.items() if not (dtype == "float32" and source != "float32" and _tame(job, m))]
        # an explicit --mlx-scales refuses nothing, so its counts only go into the summary: where the C kernel
        # converts a module's words they are counted there, tile by tile in the cache, as they are written (an extra
        # pass over every word cost 0.35 s of 2.4 for a 1 GB checkpoint, 2026-12-02); the default float32 form must
        # refuse before writing, so it counts first. Counted or not, DST appears only once after_write() has them all
        pending = [p for p in count if job.options.get("mlx_scales") is not None and _counted_while_written(job, ckpt.modules[p])]
        # prefix -> its masks, and {a piece's first word column: (its rows, (cpu, metal))}, from its first piece on
        plan["pending"] = {p: {} for p in pending}
        plan["modules"] = {p: c for p, c in ((p, self.differences(job, ckpt.modules[p], dtype)) for p in count
                                             if p not in plan["pending"]) if any(c.values())}
        job.options["mlx_plan"] = plan
        job.options["mlx_lock"] = threading.Lock()
        if pending:  # their scales' masks made on a thread meanwhile (55 ms of NumPy at 1 GB), the first module's first
            table = _table(job, dtype, source, 1 << ckpt.format.bits)
            threading.Thread(target=_prefill, args=(job, table, [ckpt.modules[p] for p in pending]), name="packq-mlx-masks",
                             daemon=True).start()
        wrong = plan["modules"]
        if wrong and job.options.get("mlx_scales") is None and not job.options.get("allow_inexact"):
            total = {b: sum(c[b] for c in wrong.values()) for b in M.ARITHMETIC}
            raise CheckpointError(
                f"{ckpt.root}: float32 scales: MLX's float32 arithmetic rounds s * q and s * z, so {total['cpu']} "
                f"weights in {len(wrong)} modules ({_names(list(wrong))}) would differ from the source's; pass "
                "--allow-inexact to write them anyway")

    def differences(self, job: Job, m: Module, dtype: str) -> dict[str, int]:
        """How many of a module's weights MLX computes differently from the source's, per backend, for scales and
        biases in ``dtype``: each rounded to the source's dtype and compared (+0 and -0 alike). A weight's MLX value
        and source value depend only on its code and its (group, column)'s scale and zero-point, so each (group,
        column) gets a mask of the codes that differ (:func:`code_masks`, each (scale, zero-point) computed once per
        conversion by :class:`MaskTable`) and the count is the weights whose code's bit is set: by the C kernel from
        4-bit words (:func:`packq.backends.numpy.mlx_counts`), else from each (group, column)'s histogram of codes
        (:func:`counts_by_masks`); weight by weight where a group holds fewer weights than codes (8 bits)."""
        source = SOURCE_DTYPES[m.infos["scales"].dtype]
        a = module_arrays(job.ckpt, m.prefix)  # matrices: stacked experts are refused
        levels, size = 1 << m.bits, m.k // m.groups
        if levels <= size and m.bits == 4 and numpy_kernels.c_kernels() is not None:
            masks = self.masks(job, m, dtype, a)
            if job.ckpt.format.method == "awq":
                words = numpy_kernels.weight_to_ct_rows(a["qweight"], 0, m.n // 8)
            else:  # GPTQ's words (K/8, N): compressed-tensors' weight_packed transposed back
                words = np.ascontiguousarray(_swap(a["qweight"].view(np.int32)))
            got = numpy_kernels.mlx_counts(words, masks)
            assert got is not None
            return dict(zip(M.ARITHMETIC, got))
        counts = dict.fromkeys(M.ARITHMETIC, 0)
        width = max(32, BLOCK // m.k // 32 * 32) if m.n % 32 == 0 else m.n  # whole words at every width
        for n0 in range(0, m.n, width):
            block = _columns(job, m, a, n0, min(m.n, n0 + width))
            if levels > size:
                q, z, s = _canonical(job, m, block)
                part = counts_direct(q, z, s, dtype, source)
            else:
                hist = None
                if job.ckpt.format.method == "awq":
                    hist = numpy_kernels.awq_histogram_t(np.ascontiguousarray(block["qweight"]), m.groups)
                q, z, s = _canonical(job, m, block, weights=hist is None)
                table = _table(job, dtype, source, levels)
                part = counts_by_masks(code_histogram(q, m.groups, levels) if hist is None else hist, table(z, s))
            counts = {b: counts[b] + part[b] for b in M.ARITHMETIC}
        return counts

    def masks(self, job: Job, m: Module, dtype: str, a: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """A module's (N, G) masks of the codes whose weights MLX computes unlike the source's (:func:`code_masks`)
        for scales and biases in ``dtype``."""
        a = a if a is not None else {p: module_array(job.ckpt, m, p, floats=p == "scales") for p in ("qzeros", "scales")}
        _, z, s = _canonical(job, m, a, weights=False)
        return _table(job, dtype, SOURCE_DTYPES[m.infos["scales"].dtype], 1 << m.bits).transposed(z, s)

    @staticmethod
    def scales_biases(s: np.ndarray, z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """MLX's scales and biases (..., N, G) from canonical scales and zero-points (..., G, N), holding ``dtype``
        values (bfloat16 as float32): -s * z computed in float32 (exact from float16/bfloat16 scales), rounded once."""
        s32 = s.astype(np.float32)
        return (np.ascontiguousarray(_swap(M.round_to(s32, dtype))),
                np.ascontiguousarray(_swap(M.round_to(-(s32 * z.astype(np.float32)), dtype))))

    # ------------------------------------------------------------ writing
    def outputs(self, job: Job, m: Module, part: str) -> list[Output]:
        if part == "qweight":  # compressed-tensors' symmetric scheme stores no zero points: biases follow the weight
            return [("weight", "mlx_weight")] + ([] if "qzeros" in m.names else [("biases", "mlx_biases")])
        if part == "qzeros":
            return [("biases", "mlx_biases")]
        if part == "scales":
            return [("scales", "mlx_scales")]
        return []  # g_idx (checked trivial: act-order is refused) and weight_shape (checked)

    def entry(self, job: Job, m: Module, action: str) -> tuple[str, tuple[int, ...]]:
        if action == "mlx_weight":
            return "U32", (m.n, m.words(m.k))
        return STORED[job.options["mlx_plan"]["scales"]], (m.n, m.groups)

    def pieces(self, job: Job, f: Reader, m: Module, action: str) -> list[Piece] | None:
        if action != "mlx_weight":
            return None
        if m.transposed:  # compressed-tensors' weight_packed is MLX's weight, byte for byte
            return [Piece(f.tensors[m.names["qweight"]].nbytes, copy=(m.names["qweight"], 0))]
        # from AWQ: the bytes compressed-tensors' weight_packed gets, made by the same pieces (4.4x a copy whole,
        # through a GPTQ array and its transposed copy; 2026-12-01), counted as they are made where prepare left it
        if m.prefix in job.options["mlx_plan"]["pending"]:
            return awq_weight_pieces(job, f, m, make=functools.partial(self._counted_piece, job, m))
        return awq_weight_pieces(job, f, m)

    def _counted_piece(self, job: Job, m: Module, qweight: np.ndarray, c0: int, c1: int, out: np.ndarray) -> np.ndarray:
        """A piece of MLX's weight (word columns [c0, c1) of AWQ's qweight), its weights counted by the C kernel as
        it converts them; the module's counts go into the plan once all of its rows are counted."""
        plan, lock = job.options["mlx_plan"], job.options["mlx_lock"]
        with lock:
            state = plan["pending"].get(m.prefix)
            if state is not None and "masks" not in state:
                state["masks"], state["done"] = self.masks(job, m, plan["scales"]), {}
            masks = None if state is None or c0 in state["done"] else state["masks"][8 * c0: 8 * c1]
        made = None if masks is None else numpy_kernels.weight_to_ct_piece_mlx(qweight, c0, c1, out, masks)
        if made is None:  # counted already, or no C kernel now: after_write() counts what is left
            return numpy_kernels.weight_to_ct_piece(qweight, c0, c1, out)
        words, counts = made
        with lock:
            state = plan["pending"].get(m.prefix)
            if state is not None and c0 not in state["done"]:
                state["done"][c0] = (8 * (c1 - c0), counts)
                if sum(rows for rows, _ in state["done"].values()) == m.n:  # every row counted
                    total = {b: sum(c[i] for _, c in state["done"].values()) for i, b in enumerate(M.ARITHMETIC)}
                    del plan["pending"][m.prefix]
                    if any(total.values()):
                        plan["modules"][m.prefix] = total
        return words

    def after_write(self, job: Job) -> None:
        """The counts of the modules the writing pass did not count whole (none where the C kernel converted every
        AWQ weight), then the plan's modules in the checkpoint's order."""
        plan = job.options["mlx_plan"]
        for prefix in list(plan["pending"]):
            counts = self.differences(job, job.ckpt.modules[prefix], plan["scales"])
            del plan["pending"][prefix]
            if any(counts.values()):
                plan["modules"][prefix] = counts
        plan["modules"] = {p: plan["modules"][p] for p in job.ckpt.modules if p in plan["modules"]}

    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        if action == "mlx_weight":
            words = job.read(m, "qweight", f).view(np.int32)  # GPTQ's layout, or AWQ's
            if job.ckpt.format.method == "awq":
                words = job.convert(awq.weight_to_gptq, words)
            return np.ascontiguousarray(_swap(words)).view(np.uint32)
        # scales and biases come from the same scales and zero-points: made together, the second one kept for its call
        kept, lock = job.options.setdefault("mlx_kept", {}), job.options["mlx_lock"]
        with lock:
            made = kept.pop((m.prefix, action), None)
        if made is not None:
            return made
        parts = {"qzeros": module_array(job.ckpt, m, "qzeros"), "scales": module_array(job.ckpt, m, "scales", floats=True)}
        q, z, s = _canonical(job, m, parts, weights=False)
        dtype = job.options["mlx_plan"]["scales"]
        made = numpy_kernels.mlx_scales_biases(s, z, dtype)  # float16 scales: one C pass (2 ms -> 0.3 ms a module)
        scales, biases = made if made is not None else (_stored(x, dtype) for x in self.scales_biases(s, z, dtype))
        with lock:
            kept[(m.prefix, "mlx_biases" if action == "mlx_scales" else "mlx_scales")] = biases if action == "mlx_scales" else scales
        return scales if action == "mlx_scales" else biases

    def config(self, job: Job, config: dict[str, Any]) -> None:
        config.pop("quantization_config", None)
        text = config.get("text_config")
        if isinstance(text, dict):
            text.pop("quantization_config", None)  # mlx-lm looks there too
        fmt = job.ckpt.format
        config["quantization"] = {"group_size": fmt.group_size, "bits": fmt.bits, "mode": "affine"}

    def summary(self, job: Job) -> dict[str, Any]:
        plan = job.options["mlx_plan"]
        if plan["pending"]:  # after_write() completes them before DST is committed
            raise CheckpointError(f"MLX counts of {_names(list(plan['pending']))} were never completed")
        wrong = plan["modules"]
        per = {b: sum(c[b] for c in wrong.values()) for b in M.ARITHMETIC}
        scale_bytes = sum(2 * m.n * m.groups for m in job.ckpt.modules.values()) * np.dtype(
            "float32" if plan["scales"] == "float32" else "float16").itemsize
        return {"mlx": {"scales": plan["scales"], "source_dtype": plan["source_dtype"], "weights": plan["weights"],
                        "differing": per, "exact": {b: per[b] == 0 for b in M.ARITHMETIC},
                        "modules_differing": {b: sorted(p for p, c in wrong.items() if c[b]) for b in M.ARITHMETIC},
                        "scales_biases_bytes": scale_bytes, "note": form_note(plan["scales"], plan["source_dtype"])}}

    # ------------------------------------------------------------ verifying
    def verify(self, job: Job, out: Path, check_each) -> None:
        """Every module's written weight, scales and biases dequantized as MLX's CPU and Metal compute them, rounded to
        the source's dtype, against the source's weights: bit for bit where packq said the form is exact, and
        differing in exactly the counted weights where it said it is not."""
        where = {name: shard for shard in map(SafetensorsFile, sorted(out.glob("*.safetensors"))) for name in shard.tensors}
        plan = job.options["mlx_plan"]
        dtype = plan["scales"]
        if plan["pending"]:
            raise CheckpointError(f"MLX counts of {_names(list(plan['pending']))} were never completed")

        def read(name: str) -> np.ndarray:
            with where[name].open() as f:
                if where[name].tensors[name].dtype == "BF16":
                    return f.floats(name)
                return f.array(name)

        def check(prefix: str) -> None:
            m = job.ckpt.modules[prefix]
            source = SOURCE_DTYPES[m.infos["scales"].dtype]
            try:
                weight, scales, biases = (read(f"{prefix}.{p}") for p in ("weight", "scales", "biases"))
            except KeyError as e:
                raise CheckpointError(f"verification failed: {e.args[0]} was not written") from None
            if weight.dtype != np.uint32 or weight.shape != (m.n, m.words(m.k)) or scales.shape != (m.n, m.groups):
                raise CheckpointError(f"verification failed: {prefix}'s MLX tensors have the wrong dtype or shape")
            want = _zero_alike(M.round_to(_swap(job.source.weights(job, prefix)), source))
            q = np.asarray(numpy_backend.run(B.unpack, weight.view(np.int32), direction="column", bits=m.bits))
            for arithmetic in M.ARITHMETIC:
                got = _zero_alike(M.round_to(M.dequantize(q.astype(np.int16), scales, biases, dtype, arithmetic), source))
                differ = int(np.count_nonzero(got != want))
                if differ != plan["modules"].get(prefix, {}).get(arithmetic, 0):
                    raise CheckpointError(f"verification failed: {prefix} dequantizes in MLX ({arithmetic}) to {differ} "
                                          "weights unlike the source's, not as packq counted")

        check_each(check)


def counts_direct(q: np.ndarray, z: np.ndarray, s: np.ndarray, dtype: str, source: str) -> dict[str, int]:
    """Per MLX arithmetic, how many weights (q (K, N), z and s (G, N) canonical) MLX computes, from scales and biases
    in ``dtype``, unlike the source's (q - z) * s, both rounded to the source's dtype (+0 and -0 alike): every weight
    dequantized both ways (the reference :func:`counts_by_histogram` must match)."""
    want = _zero_alike(M.round_to(dequantize(q, z, s, None), source))
    scales, biases = MLX.scales_biases(s, z, dtype)
    return {arithmetic: int(np.count_nonzero(
        _zero_alike(M.round_to(M.dequantize(_swap(q), scales, biases, dtype, arithmetic), source)) != _swap(want)))
        for arithmetic in M.ARITHMETIC}


def counts_by_histogram(z: np.ndarray, s: np.ndarray, hist: np.ndarray, dtype: str, source: str) -> dict[str, int]:
    """:func:`counts_direct` from each (group, column)'s histogram of codes ``hist`` (G, N, levels): the ``levels``
    codes of every (group, column) dequantized both ways (a (G * levels, N) matrix of codes), each differing code
    weighted by how many weights have it; the same products as weight by weight, so the same counts.

    Examples
    --------
    One group of 128 weights, codes 0..15 eight times each, z = 8, a float16 scale 0.1, float16 MLX scales: the
    same counts as every weight's

    >>> import numpy as np
    >>> q = np.tile(np.arange(16, dtype=np.int16), 8)[:, None]
    >>> z, s = np.full((1, 1), 8, np.int16), np.full((1, 1), 0.1, np.float16)
    >>> counts_by_histogram(z, s, code_histogram(q, 1, 16), "float16", "float16") == counts_direct(q, z, s, "float16", "float16")
    True
    """
    groups, n, levels = hist.shape
    codes = np.broadcast_to(np.tile(np.arange(levels, dtype=np.int16), groups)[:, None], (groups * levels, n))
    want = _swap(_zero_alike(M.round_to(dequantize(codes, z, s, None), source)))  # (N, G * levels)
    scales, biases = MLX.scales_biases(s, z, dtype)
    counts = {}
    for arithmetic in M.ARITHMETIC:
        got = _zero_alike(M.round_to(M.dequantize(_swap(codes), scales, biases, dtype, arithmetic), source))
        differ = (got != want).reshape(n, groups, levels)
        counts[arithmetic] = int(np.einsum("gnv,ngv->", hist, differ, dtype=np.int64))
    return counts


def code_masks(z: np.ndarray, s: np.ndarray, dtype: str, source: str, levels: int) -> np.ndarray:
    """Per (group, column) of canonical z and s (G, N), which of its ``levels`` (at most 16) codes MLX computes, from
    scales and biases in ``dtype``, unlike the source's (q - z) * s (both rounded to the source's dtype, +0 and -0
    alike): (G, N) uint32, bit c set where code c differs in MLX's "cpu" arithmetic, bit 16 + c in "metal". Every
    code of every (group, column) dequantized both ways: the products :func:`counts_by_histogram` compares.

    Examples
    --------
    A float16 scale of 0.1 and zero-point 8 in float16: the codes that differ on MLX's CPU (two roundings), none on
    Metal (one rounding of s * q + b, here the source's)

    >>> import numpy as np
    >>> mask = int(code_masks(np.full((1, 1), 8, np.int16), np.full((1, 1), 0.1, np.float16), "float16", "float16", 16)[0, 0])
    >>> [c for c in range(16) if mask >> c & 1], [c for c in range(16) if mask >> (16 + c) & 1]
    ([6, 7, 9, 10, 12, 15], [])
    """
    if not 0 < levels <= 16:
        raise ValueError(f"levels: expected 1 to 16 codes (a mask of 16 bits), got {levels}")
    groups, n = z.shape
    codes = np.broadcast_to(np.arange(levels, dtype=np.int16), (n, groups, levels))  # (N, G, levels): MLX's layout
    with np.errstate(all="ignore"):  # infinite and NaN products compare as their bits, as in counts_direct
        # the source's (q - z) * s as packq.formats.gptq.dequantize_grouped computes it, in NumPy itself (the array
        # API namespace takes 0.15 s to import, more than this whole function at a 1 GB checkpoint's 135k pairs)
        qz = codes - _swap(z)[:, :, None]
        want = _zero_alike(M.round_to(qz.astype(s.dtype) * _swap(s)[:, :, None], source))
        scales, biases = MLX.scales_biases(s, z, dtype)
        out = np.zeros((n, groups), np.uint32)
        for i, arithmetic in enumerate(M.ARITHMETIC):
            got = _zero_alike(M.round_to(M.dequantize(codes.reshape(n, groups * levels), scales, biases, dtype, arithmetic),
                                         source))
            # bit c of each (column, group) where code c differs: its levels bits packed, little-endian
            packed = np.packbits(got.reshape(n, groups, levels) != want, axis=-1, bitorder="little")
            bits = packed[..., 0].astype(np.uint32) | (packed[..., 1].astype(np.uint32) << np.uint32(8) if levels > 8 else 0)
            out |= bits << np.uint32(16 * i)
    return _swap(out)


class MaskTable:
    """:func:`code_masks` of float16 or bfloat16 source scales from a table, filled once per conversion: a mask
    depends only on the scale's 16 bits and the zero-point, so each scale value seen gets the masks of all its
    zero-points in [0, levels] at once (a 1 GB checkpoint's 12.6 million (group, column)s have about 9,500 distinct
    float16 scales); float32 scales, or zero-points outside [0, levels], are computed pair by pair.

    Examples
    --------
    >>> import numpy as np
    >>> z, s = np.array([[8, 3]], np.int16), np.array([[0.1, 0.1]], np.float16)
    >>> table = MaskTable("float16", "float16", 16)
    >>> bool((table(z, s) == code_masks(z, s, "float16", "float16", 16)).all())
    True
    """

    def __init__(self, dtype: str, source: str, levels: int) -> None:
        self.dtype, self.source, self.levels = dtype, source, levels
        self.zn = levels + 1  # a GPTQ v1 source's zero-points (stored z - 1) reach 2**bits
        self._scales = self._table = None
        if source in ("float16", "bfloat16"):
            self._scales = np.zeros(65536, bool)  # the scales whose masks the table holds
            self._table = np.zeros(65536 * self.zn, np.uint32)
        self._lock = threading.Lock()

    def _bits(self, s: np.ndarray) -> np.ndarray | None:
        """The scales' 16 bits, or None where they are not float16/bfloat16 values."""
        if self._table is None:
            return None
        if self.source == "float16" and s.dtype == np.float16:
            return np.ascontiguousarray(s).view(np.uint16)
        if self.source == "bfloat16" and s.dtype == np.float32:
            u = np.ascontiguousarray(s).view(np.uint32)
            return None if (u & np.uint32(0xFFFF)).any() else (u >> np.uint32(16)).astype(np.uint16)
        return None

    def _fill(self, bits: np.ndarray) -> None:
        """The masks of every zero-point of each scale in ``bits`` not yet in the table."""
        assert self._scales is not None and self._table is not None
        with self._lock:
            present = np.zeros(65536, bool)
            present[bits.ravel()] = True
            new = np.flatnonzero(present & ~self._scales)
            if new.size:
                keys = (new[:, None] * self.zn + np.arange(self.zn)).ravel()
                values = keys // self.zn
                scales = (values.astype(np.uint16).view(np.float16) if self.source == "float16"
                          else (values.astype(np.uint32) << np.uint32(16)).view(np.float32))
                self._table[keys] = code_masks((keys % self.zn).astype(np.int16)[None], scales[None], self.dtype,
                                               self.source, self.levels)[0]
                self._scales[new] = True

    def _fits(self, z: np.ndarray) -> bool:
        return z.size > 0 and int(z.min()) >= 0 and int(z.max()) < self.zn

    def prefill(self, s: np.ndarray) -> None:
        """Put the masks of ``s``'s scales in the table (ahead of their use, on another thread)."""
        bits = self._bits(s)
        if bits is not None:
            self._fill(bits)

    def __call__(self, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        """(G, N) uint32 masks of z and s (G, N): :func:`code_masks`."""
        bits = self._bits(s)
        if bits is None or not self._fits(z):
            return code_masks(z, s, self.dtype, self.source, self.levels)
        assert self._table is not None
        self._fill(bits)
        return self._table[bits.astype(np.int32) * self.zn + z.astype(np.int32)]

    def transposed(self, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        """The masks of z and s (G, N) as (N, G), C-contiguous: by the C kernel's gather where it is built."""
        ck = numpy_kernels.c_kernels()
        bits = self._bits(s)
        if ck is None or bits is None or not self._fits(z):
            return np.ascontiguousarray(_swap(self(z, s)))
        self._fill(bits)
        groups, n = z.shape
        out = np.empty((n, groups), np.uint32)
        ck.mlx_masks(bits, np.ascontiguousarray(z, dtype=np.uint8), groups, n, self._table, self.zn, out, 0, n)
        return out


def counts_by_masks(hist: np.ndarray, masks: np.ndarray) -> dict[str, int]:
    """Per MLX arithmetic, the weights whose code's bit is set in their (group, column)'s mask (:func:`code_masks`),
    from each (group, column)'s histogram of codes ``hist`` (G, N, levels) and ``masks`` (G, N).

    Examples
    --------
    >>> import numpy as np
    >>> hist = np.array([[[2, 0, 1, 5]]])  # one (group, column): code 0 twice, 2 once, 3 five times
    >>> counts_by_masks(hist, np.array([[0b1001 | 0b0100 << 16]], np.uint32))
    {'cpu': 7, 'metal': 1}
    """
    levels = hist.shape[-1]
    shifts = np.arange(levels, dtype=np.uint32)
    return {arithmetic: int(np.einsum("gnv,gnv->", hist, (masks[..., None] >> (shifts + np.uint32(16 * i))) & np.uint32(1),
                                      dtype=np.int64))
            for i, arithmetic in enumerate(M.ARITHMETIC)}


def _table(job: Job, dtype: str, source: str, levels: int) -> MaskTable:
    """This conversion's :class:`MaskTable` for scales in ``dtype`` of ``source`` scales at ``levels`` codes."""
    tables = job.options.setdefault("mlx_tables", {})
    key = (dtype, source, levels)
    if key not in tables:
        tables[key] = MaskTable(dtype, source, levels)
    return tables[key]


def code_histogram(q: np.ndarray, groups: int, levels: int) -> np.ndarray:
    """How often each code of q (K, N) is in each (group of K / groups consecutive rows, column): (G, N, levels).

    Examples
    --------
    >>> import numpy as np
    >>> code_histogram(np.array([[0], [3], [3], [1]]), 2, 4)[:, 0].tolist()
    [[1, 0, 0, 1], [0, 1, 0, 1]]
    """
    k, n = q.shape
    at = (np.arange(groups, dtype=np.int64)[:, None, None] * n + np.arange(n, dtype=np.int64)) * levels
    index = at + q.reshape(groups, k // groups, n).astype(np.int64)
    return np.bincount(index.ravel(), minlength=groups * n * levels).reshape(groups, n, levels)


def _columns(job: Job, m: Module, a: dict[str, np.ndarray], n0: int, n1: int) -> dict[str, np.ndarray]:
    """A module's arrays for output features (source columns) n0..n1, whole packed words."""
    if job.ckpt.format.method == "awq":
        cols = {"qweight": slice(n0 // 8, n1 // 8), "qzeros": slice(n0 // 8, n1 // 8), "scales": slice(n0, n1)}
    else:
        cols = {"qweight": slice(n0, n1), "qzeros": slice(m.words(n0), m.words(n1)), "scales": slice(n0, n1)}
    return {p: v[..., cols[p]] if p in cols else v for p, v in a.items()}


def _canonical(job: Job, m: Module, a: dict[str, np.ndarray], weights: bool = True):
    """(q (K, n), z (G, n), s (G, n)) of a module's arrays: the values, the zero-points read as the producer wrote
    them, the scales as floats (bfloat16 as float32); q is None unless ``weights``."""
    if job.ckpt.format.method == "awq":
        q = np.asarray(numpy_backend.run(awq.unpack_awq, a["qweight"].view(np.int32))).astype(np.int16) if weights else None
        z = np.asarray(numpy_backend.run(awq.unpack_awq, a["qzeros"].view(np.int32))).astype(np.int16)
    else:
        q = (np.asarray(numpy_backend.run(B.unpack, a["qweight"].view(np.int32), direction="row", bits=m.bits))
             .astype(np.int16) if weights else None)
        z = source_zero_points(job, a["qzeros"])
    return q, z, a["scales"]


def _prefill(job: Job, table: MaskTable, modules: list[Module]) -> None:
    """The table's masks of these modules' scales, ahead of the writing pass that needs them."""
    try:
        for m in modules:
            table.prefill(module_array(job.ckpt, m, "scales", floats=True))
    except Exception:  # noqa: BLE001 - only a head start: what needs the masks fills (and reports) them itself
        return


def _counted_while_written(job: Job, m: Module) -> bool:
    """Whether the writing pass converts this module's weight by the C kernel that counts it (AWQ's 4-bit words, a
    matrix, the NumPy backend, groups of whole 4-word chunks): :meth:`MLX.pieces`."""
    return (job.ckpt.format.method == "awq" and not m.lead and m.bits == 4 and job.convert.be.name == "numpy"
            and m.k % 32 == 0 and (m.k // m.groups) % 32 == 0 and numpy_kernels.c_kernels() is not None)


def _tame(job: Job, m: Module) -> bool:
    """Whether a module's scales are finite and small enough that s * q and s * z cannot overflow float32."""
    s = module_array(job.ckpt, m, "scales", floats=True).astype(np.float32)
    return bool(np.isfinite(s).all()) and float(np.abs(s).max(initial=0.0)) < 2.0 ** (127 - m.bits)


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _zero_alike(x: np.ndarray) -> np.ndarray:
    """Float bits with -0 as +0 and every NaN as one: each compute alike in a matmul. (Which NaN an operation of two
    NaNs returns, its sign among them, depends on NumPy's loop for the array's shape and strides, not on the values:
    a source's NaN scale counted 2 weights in one layout and 0 in another before NaNs were made one.)"""
    bits = np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")
    nan = np.array(np.nan, x.dtype).view(bits.dtype)
    return np.where(x == 0, 0, np.where(np.isnan(x), nan, bits))


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values held as float32 (bfloat16 values) or in ``dtype``, as the bytes the file stores."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return np.ascontiguousarray(x, dtype=dtype)


FORMAT = MLX()
