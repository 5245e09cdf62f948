"""The command line: ``packq convert SRC DST`` and ``packq inspect SRC``.

Errors in what was asked (a missing folder, a corrupt file, a format packq
does not convert) print one line and exit with status 2, with nothing written.

Only the standard library is imported before :func:`main` has installed its signal handler: SIGTERM and
SIGINT end a run in one line (exit 130) from the first moment, during NumPy's import, the checkpoint's
analysis and ``inspect`` too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any


def _loaders() -> list[str]:
    """The engines that load GPTQ checkpoints: the names --for takes."""
    from packq.formats.engines import ENGINES

    return [name for name, e in ENGINES.items() if e.reads_v1 is not None]

def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs kept as written: their example lines must stay one command each."""


# The help texts. Each epilog's lines that start with "packq " are commands that tests/test_docs.py runs from
# a folder holding examples/, and the documentation's command-line reference prints them: keep them runnable.
_TOP = """\
Exact conversion of quantized LLM checkpoints, for the engine that will load them.

packq reads a Hugging Face checkpoint (a folder, or a Hub repo id) quantized as AWQ,
GPTQ (v1 or v2) or compressed-tensors, and writes it in another format or as float
weights, bit-exactly and streamed, in the zero-point encoding that the engine named
by --for computes exactly; where no encoding is exact it says so before writing."""
_TOP_EXAMPLES = """\
examples:
  packq convert examples/tiny-llama-awq tiny-llama-gptq --for transformers --verify
  packq inspect examples/tiny-llama-awq
  packq formats

Run 'packq COMMAND --help' for a command's options; the full manual is the
documentation site under docs/ (built with 'python -m sphinx -W -b html docs docs/_build/html')."""
_CONVERT = """\
Convert the checkpoint SRC to the format --to names (default: gptq), into DST.

The whole source is checked first (config, index, every shard header, every
module's shapes); then one tensor at a time is converted, unquantized tensors and
other files are copied byte for byte (quantization configs rewritten), and memory
stays bounded by the largest tensor.
SRC is never written; DST appears only when complete (atomically, fsynced).
GPTQ v1 is read differently by engines once a zero-point is 0: --for ENGINE
writes what that engine computes exactly, and convert refuses, before writing,
what no encoding can give it exactly (unless --allow-inexact). Errors are one
line on stderr and exit status 2, with nothing written."""
_CONVERT_EXAMPLES = """\
examples:
  # GPTQ that transformers (and GPTQModel, vLLM) load exactly, checked bit for bit
  packq convert examples/tiny-llama-awq tiny-llama-gptq --for transformers --verify
  # GPTQ v1 written per field, for TGI and LoRAX
  packq convert examples/tiny-llama-awq tiny-llama-tgi --for tgi
  # compressed-tensors pack-quantized, vLLM's native format
  packq convert examples/tiny-llama-awq tiny-llama-ct --to compressed-tensors --verify
  # dequantized float16 weights, one rounding of (q - z) * s
  packq convert examples/tiny-llama-awq tiny-llama-f16 --to float16 --json"""
_FORMATS = """\
Print, as a Markdown table, every checkpoint format packq reads and the --to
targets it converts each to (the table in README.md is this output)."""
_FORMATS_EXAMPLES = """\
examples:
  packq formats"""
_INSPECT = """\
Describe the checkpoint SRC: its format, quantized modules, tensors and sizes,
the (group, column) zero-points equal to 0, and, for every engine packq knows,
whether it computes the checkpoint's zero-points exactly (an AWQ source: as GPTQ
v1 written per field), and where not, how many pairs in which modules. Reads
only; SRC may be a folder or a Hugging Face Hub repo id."""
_INSPECT_EXAMPLES = """\
examples:
  packq inspect examples/tiny-llama-awq
  packq inspect examples/tiny-llama-awq --json"""


def _parser() -> argparse.ArgumentParser:
    from packq.checkpoint.formats import TARGETS
    from packq.checkpoint.formats.gguf import CHOICES as GGUF_CHOICES

    LOADERS = _loaders()
    p = argparse.ArgumentParser(prog="packq", description=_TOP, epilog=_TOP_EXAMPLES, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("convert", help="convert a quantized checkpoint to another format, or to float, exactly",
                       description=_CONVERT, epilog=_CONVERT_EXAMPLES, formatter_class=_Formatter)
    c.add_argument("src", metavar="SRC", help="source model folder (never written), or a Hugging Face Hub repo id (org/name)")
    c.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id")
    c.add_argument("dst", metavar="DST", help="folder (or, with --to gguf, .gguf file) to create; it appears only when complete")
    c.add_argument("--to", choices=list(TARGETS), default=None,
                   help="target format (default: gguf for a DST ending in .gguf, else gptq); float16/bfloat16/float32 "
                        "write dequantized weights, gguf one llama.cpp file, mlx a folder for mlx-lm")
    c.add_argument("--for", dest="for_engine", metavar="ENGINE", choices=LOADERS, default=None,
                   help=f"the engine that will load the GPTQ result ({', '.join(LOADERS)}): write the format and "
                        "zero-point encoding it computes exactly; needed for v1 when a zero-point is 0")
    c.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default=None,
                   help="GPTQ zero storage: gptq = z - 1 (v1), gptq_v2 = z; default: what --for loads exactly, else gptq")
    c.add_argument("--allow-inexact", action="store_true",
                   help="with --for: write even where no encoding is exact in that engine; with --to gguf: write tensors "
                        "no exact GGUF type holds (F16, or the --gguf-type asked for); with --to mlx: write float32-scale "
                        "sources, which MLX's float32 arithmetic rounds; the summary reports the error")
    c.add_argument("--mlx-scales", choices=["float32", "float16", "bfloat16"], default=None,
                   help="--to mlx: dtype of the scales and biases (default float32: exact on every MLX backend); "
                        "float16/bfloat16 run faster in MLX, and packq reports how many weights MLX then computes differently")
    c.add_argument("--gguf-type", choices=list(GGUF_CHOICES), default=None,
                   help="with --to gguf (DST is then one file, DST.gguf): the type of every quantized tensor; auto "
                        "(default): the smallest of q4_0, q5_0, q8_0 that holds it exactly; f32 holds the exact product, "
                        "f16 the one rounding AWQ/GPTQ engines compute")
    c.add_argument("--backend", choices=["numpy", "jax"], default="numpy", help="array backend (default: numpy)")
    c.add_argument("--verify", action="store_true", help="dequantize source and result and compare bit for bit")
    c.add_argument("--allow-overflow", action="store_true",
                   help="to a float dtype: write even where weights overflow it (they become inf); default: refuse")
    c.add_argument("--force", action="store_true", help="replace an existing DST once the new one is complete")
    c.add_argument("--json", action="store_true", help="print a machine-readable summary")
    c.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    c.add_argument("--v1-zeros", choices=["field", "word"], default=None,
                   help="how a GPTQ v1 source stored zero-points of 0: word = GPTQModel/transformers (whole-word "
                        "subtraction), field = per field (TGI, LoRAX, packq); default: from the producer's metadata")
    sub.add_parser("formats", help="print the checkpoint formats and the routes between them (Markdown)",
                   description=_FORMATS, epilog=_FORMATS_EXAMPLES, formatter_class=_Formatter)
    i = sub.add_parser("inspect", help="describe a quantized checkpoint and which engines read its zero-points exactly",
                       description=_INSPECT, epilog=_INSPECT_EXAMPLES, formatter_class=_Formatter)
    i.add_argument("src", metavar="SRC", help="model folder, or a Hugging Face Hub repo id (org/name)")
    i.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id")
    i.add_argument("--json", action="store_true", help="print a machine-readable summary")
    i.add_argument("--v1-zeros", choices=["field", "word"], default=None,
                   help="how a GPTQ v1 source stored zero-points of 0 (as for convert); default: from the producer's metadata")
    i.add_argument("--mlx", action="store_true",
                   help="read every weight and say, per MLX form and module, what MLX's CPU and Metal compute")
    return p


def _print_gguf(s: dict[str, Any]) -> None:
    types = ", ".join(f"{t}: {n}" for t, n in sorted(s["types"].items()))
    print(f"converted {s['from']} -> GGUF ({s['architecture']}; --gguf-type {s['gguf_type']})")
    print(f"  {s['modules']} quantized modules -> {sum(s['types'].values())} quantized tensors ({types}); "
          f"{s['tensors_in']} -> {s['tensors_out']} tensors; {_size(s['bytes_in'])} -> {_size(s['file_bytes'])}")
    if s["bits_per_weight_in"]:
        print(f"  quantized weights: {s['bits_per_weight_in']:.3f} -> {s['bits_per_weight_out']:.3f} bits a weight")
    if s["inexact_tensors"]:
        print(f"  INEXACT: {len(s['inexact_tensors'])} tensors ({', '.join(s['inexact_tensors'][:3])}"
              f"{', ...' if len(s['inexact_tensors']) > 3 else ''}); largest weight error {s['max_weight_error']:.6g}")
    if "F16" in s["types"] or "BF16" in s["types"]:
        print("  F16/BF16 hold (q - z) * s rounded once, as AWQ/GPTQ engines compute it; Q4_0/Q5_0/Q8_0/F32 the exact product")
    if s["verified"]:
        print("  verified: every tensor, read back and dequantized as ggml does, is the source's exact weights"
              + (" (inexact ones: the rounding reported)" if s["inexact_tensors"] else ""))
    print(f"  wrote {s['dst']!r} in {s['seconds']:.2f} s")


def _print_convert(s: dict[str, Any]) -> None:  # (print is _render's: see _emit)
    if s["to"] == "gguf":
        return _print_gguf(s)
    target = {"gptq": f"GPTQ ({s['checkpoint_format']})", "awq": "AWQ gemm", "mlx": "MLX affine",
              "compressed-tensors": "compressed-tensors pack-quantized"}.get(s["to"], f"{s['to']} weights")
    engine = f" for {s['for']}" if s["for"] else ""
    print(f"converted {s['from']} -> {target}{engine}")
    if s["rebiased"]:
        print(f"  rebiased {s['rebiased']} (group, column) pairs from zero-point 0 to 1 (q + 1): same weights")
    if s["inexact_pairs"]:
        print(f"  INEXACT in {s['for']}: {s['inexact_pairs']} pairs (zero-point 0 holding a 15); "
              f"largest weight error {s['max_weight_error']:.6g}")
    for note in s.get("notes", []):
        print(f"  note: {note}")
    print(f"  {s['modules']} quantized modules in {s['shards']} shard(s); "
          f"{s['tensors_in']} -> {s['tensors_out']} tensors; {_size(s['bytes_in'])} -> {_size(s['bytes_out'])}")
    if "mlx" in s:
        _print_mlx(s["mlx"])
    if s["verified"] and "mlx" in s and any(s["mlx"]["differing"].values()):
        print("  verified: the written tensors, dequantized as MLX's CPU and Metal compute them, give the source's "
              "weights but for exactly the weights counted above")
    elif s["verified"]:
        reader = "MLX's CPU and Metal arithmetic" if "mlx" in s else s["for"] or "packq"
        print(f"  verified: every module dequantizes, as {reader} reads it, to the same bits as the source")
    print(f"  wrote {s['dst']!r} in {s['seconds']:.2f} s ({s['backend']} backend)")


def _print_mlx(x: dict[str, Any]) -> None:
    print(f"  MLX scales and biases: {x['scales']} ({_size(x['scales_biases_bytes'])}; source scales {x['source_dtype']})")
    for backend, n in x["differing"].items():
        share = f" ({100 * n / x['weights']:.2g}%)" if n else ""
        verdict = "exact: every weight as the source's" if not n else (
            f"{n} of {x['weights']} weights{share} differ from the source's, in {len(x['modules_differing'][backend])} modules")
        print(f"    {'Metal' if backend == 'metal' else 'CPU':<5} {verdict}")
    print(f"    {x['note']}")


def _print_inspect_gguf(s: dict[str, Any]) -> None:
    print(f"{s['path']}: GGUF, architecture {s['architecture']}, {s['tensors']} tensors, {_size(s['bytes'])}, "
          f"{s['metadata_keys']} metadata keys")
    for t, e in sorted(s["tensors_by_type"].items()):
        bpw = 8 * e["bytes"] / e["weights"] if e["weights"] else 0
        print(f"  {t}: {e['tensors']} tensors, {e['weights']} weights, {_size(e['bytes'])} ({bpw:.2f} bits a weight)")


def _print_inspect(s: dict[str, Any]) -> None:
    if s.get("format") == "GGUF":
        return _print_inspect_gguf(s)
    print(f"{s['path']!r}: {s['format']}")
    print(f"  {s['quantized_modules']} quantized modules; {s['tensors']} tensors in {s['shards']} shard(s), "
          f"{_size(s['bytes'])}")
    print("  " + ", ".join(f"{d}: {n} ({_size(s['bytes_by_dtype'][d])})" for d, n in s["tensors_by_dtype"].items()))
    print(f"  zero-points equal to 0: {s['zero_point_0']} of {s['zero_points']} (group, column) pairs, "
          f"in {len(s['zero_point_0_modules'])} modules")
    if s["v1_ambiguous"]:
        print(f"  GPTQ v1 zero-points read differently by engines in {len(s['v1_ambiguous'])} modules, and the "
              "producer is unknown: pass --v1-zeros word|field")
    target = "as GPTQ v1 written per field" if s["method"] == "awq" else "as stored"
    print(f"  engines ({target}):")
    for name, e in s["engines"].items():
        verdict = ("unknown" if e["exact"] is None else "exact" if e["exact"] else "REFUSED" if e.get("refused")
                   else f"WRONG in {e['pairs']} pairs" if e["pairs"] else "cannot load it")  # (none read wrong: not its format)
        where = f" ({', '.join(e['modules'][:3])}{', ...' if len(e['modules']) > 3 else ''})" if e["modules"] else ""
        print(f"    {name:<13} {verdict}{where}: {e['note']}")
    if "mlx" in s:
        x = s["mlx"]
        if "refused" in x:
            print(f"  MLX (--to mlx): refused: {x['refused']}")
            return
        print(f"  MLX (--to mlx), weights MLX computes differently from the source's, of {x['weights']}:")
        for form in ("float32", "float16", "bfloat16"):
            f = x[form]
            worst = sorted(f["modules"].items(), key=lambda kv: -kv[1]["cpu"])[:3]
            where = ", ".join(f"{p} {c['cpu']}/{c['metal']}" for p, c in worst if c["cpu"] or c["metal"])
            print(f"    --mlx-scales {form:<8}: CPU {f['differing']['cpu']}, Metal {f['differing']['metal']}"
                  + (f" (most: {where})" if where else ""))
    g = s.get("gguf")
    if g:
        print(f"  GGUF (--to gguf), of {g['modules']} modules ({g['blocks']} blocks of 32 weights):")
        for t in ("Q4_0", "Q5_0", "Q8_0"):
            print(f"    {t:<5} holds {g[t]['modules']} modules exactly ({g[t]['blocks']} of {g['blocks']} blocks)")
        share = {t: 100 * g[t]["weights_rounded"] / g["weights"] if g["weights"] else 0 for t in ("F16", "BF16")}
        print(f"    F16 rounds {share['F16']:.1f}% of the weights (once, as AWQ/GPTQ engines compute in float16), "
              f"BF16 {share['BF16']:.1f}%; F32 holds them all exactly")
        auto = ", ".join(f"{t}: {n}" for t, n in g["auto"].items()) or "none"
        print(f"    auto: {auto}" + (f"; no block type holds {len(g['none'])} modules" if g["none"] else ""))


def main(argv: Sequence[str] | None = None) -> int:
    ours = False
    try:  # the first statement: a signal from here on is reported in one line
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # SIGTERM ends it as Ctrl-C does
            signal.signal(signal.SIGTERM, _interrupt)
            ours = True
        if argv is None:
            _one_blas_thread()
        return _run(argv)
    except KeyboardInterrupt as e:
        quiet = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}  # one line, once
        try:
            dst = getattr(e, "dst", None)
            committed = getattr(e, "committed", False) or (dst is not None and _was_committed(dst))
            done = f"; DST {dst!r} was already complete" if committed and dst else "; nothing was written"
            _error(f"interrupted{done}", prefix="packq: ")
        finally:
            for s, handler in quiet.items():
                signal.signal(s, handler)
        return 130
    finally:
        if argv is None:  # the program itself: its work is done and reported; a signal now would only turn the
            for s in (signal.SIGINT, signal.SIGTERM):  # exit status of a finished run into a kill (at shutdown)
                signal.signal(s, signal.SIG_IGN)
        elif ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: the variable OpenBLAS (NumPy's BLAS) reads its thread count from when it loads, with NumPy
BLAS_THREADS = "OPENBLAS_NUM_THREADS"


def _one_blas_thread() -> None:
    """The program itself (not a caller's process: ``main(argv)``) runs NumPy's BLAS on one thread unless told
    otherwise (:data:`BLAS_THREADS` set already), so that NumPy's import does not start a pool of BLAS threads that
    packq never uses: no packq command multiplies matrices. Set before NumPy is imported, or it does nothing.
    The pool's start was 55-85 ms of every run's serial start on this project's 2-core VM (NumPy's import, by
    ``-X importtime``, 2026-12-02: 123-146 ms, 59-68 ms with one thread)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault(BLAS_THREADS, "1")


def _was_committed(dst: str) -> bool:
    from packq.checkpoint.guards import was_committed

    return was_committed(dst)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


#: C0 controls and DEL: printed as escapes, so that no file or tensor name can split the line
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _error(message: str, prefix: str = "packq: error: ") -> None:
    """One line on stderr, whatever the message holds (names are quoted where made; this is the last net)."""
    line = _CONTROL.sub(lambda m: repr(m.group())[1:-1], prefix + message)
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    line = line.encode(enc, "backslashreplace").decode(enc, "replace")
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr itself is gone: the exit status still says it
        pass


def _emit(text: str, dst: str) -> None:
    """Print a finished conversion's summary.

    The summary is printed after DST is committed, and a failure to print it (a full device, a closed
    pipe) never turns the finished conversion into an error: the exit status reports the conversion, which
    is complete. Printing before the commit would be worse: a commit that then failed (a full disk at the
    last fsync) would leave a summary saying "wrote DST" beside an error. The text is made before the
    write and encoded so that no name can fail to encode.
    """
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    text = text.encode(enc, "backslashreplace").decode(enc, "replace")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        what = f"DST {dst!r} is complete, but its summary" if dst else "the output"
        _error(f"{what} could not be printed ({why})", prefix="packq: warning: ")
        try:  # the interpreter flushes stdout at exit: let that find nothing left to fail on
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass


def _render(fn: Any, summary: dict[str, Any]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(summary)
    return buf.getvalue()


def _run(argv: Sequence[str] | None) -> int:
    from packq.checkpoint.files import describe
    from packq.checkpoint.guards import forget_commit, resources
    from packq.errors import CheckpointError

    args = _parser().parse_args(argv)
    try:
        with resources(f"packq {args.command}"):
            if args.command == "convert":
                from packq.checkpoint import convert_checkpoint

                forget_commit(args.dst)  # (a DST this process converted before: not this run's commit)
                try:
                    summary = convert_checkpoint(
                        args.src, args.dst, to=args.to or ("gguf" if args.dst.endswith(".gguf") else "gptq"),
                        checkpoint_format=args.checkpoint_format, backend=args.backend,
                        verify=args.verify, force=args.force, progress=False if (args.no_progress or args.json) else None,
                        v1_zeros=args.v1_zeros, for_engine=args.for_engine, allow_inexact=args.allow_inexact,
                        revision=args.revision, allow_overflow=args.allow_overflow, mlx_scales=args.mlx_scales, gguf_type=args.gguf_type,
                    )
                    text = json.dumps(summary, indent=2) + "\n" if args.json else _render(_print_convert, summary)
                    _emit(text, summary["dst"])
                except KeyboardInterrupt as e:  # report whether DST was put in place before it came
                    e.dst = os.path.abspath(args.dst)  # type: ignore[attr-defined]
                    raise
            elif args.command == "formats":
                from packq.checkpoint.formats import table_markdown

                _emit(table_markdown(), "")
            else:
                from packq.checkpoint import inspect_checkpoint

                summary = inspect_checkpoint(args.src, v1_zeros=args.v1_zeros, revision=args.revision, mlx=args.mlx)
                _emit(json.dumps(summary, indent=2) + "\n" if args.json else _render(_print_inspect, summary), "")
    except CheckpointError as e:
        _error(str(e))
        return 2
    except OSError as e:  # the library names files in its errors; this is the last net
        _error(describe(e, getattr(args, "dst", args.src)))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
