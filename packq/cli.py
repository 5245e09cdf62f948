"""The command line: ``packq convert SRC DST`` and ``packq inspect SRC``.

Errors in what was asked (a missing folder, a corrupt file, a format packq
does not convert) print one line and exit with status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from packq.checkpoint.files import describe
from packq.checkpoint.formats import TARGETS
from packq.errors import CheckpointError
from packq.formats.engines import ENGINES

#: engines that load GPTQ checkpoints: the names --for takes
LOADERS = [name for name, e in ENGINES.items() if e.reads_v1 is not None]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packq", description="Exact conversion of quantized LLM checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an AWQ checkpoint folder to GPTQ (or GPTQ to AWQ)")
    c.add_argument("src", help="source model folder (never written), or a Hugging Face Hub repo id (org/name)")
    c.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id")
    c.add_argument("dst", help="folder to create; it appears only when complete")
    c.add_argument("--to", choices=list(TARGETS), default="gptq",
                   help="target format (default: gptq); float16/bfloat16/float32 write dequantized weights")
    c.add_argument("--for", dest="for_engine", metavar="ENGINE", choices=LOADERS, default=None,
                   help=f"the engine that will load the GPTQ result ({', '.join(LOADERS)}): write the format and "
                        "zero-point encoding it computes exactly; needed for v1 when a zero-point is 0")
    c.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default=None,
                   help="GPTQ zero storage: gptq = z - 1 (v1), gptq_v2 = z; default: what --for loads exactly, else gptq")
    c.add_argument("--allow-inexact", action="store_true",
                   help="with --for: write even where no encoding is exact in that engine, and report the error")
    c.add_argument("--backend", choices=["numpy", "jax"], default="numpy", help="array backend (default: numpy)")
    c.add_argument("--verify", action="store_true", help="dequantize source and result and compare bit for bit")
    c.add_argument("--force", action="store_true", help="replace an existing DST once the new one is complete")
    c.add_argument("--json", action="store_true", help="print a machine-readable summary")
    c.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    c.add_argument("--v1-zeros", choices=["field", "word"], default=None,
                   help="how a GPTQ v1 source stored zero-points of 0: word = GPTQModel/transformers (whole-word "
                        "subtraction), field = per field (TGI, LoRAX, packq); default: from the producer's metadata")
    sub.add_parser("formats", help="print the checkpoint formats and the routes between them (Markdown)")
    i = sub.add_parser("inspect", help="describe a quantized checkpoint folder")
    i.add_argument("src", help="model folder, or a Hugging Face Hub repo id (org/name)")
    i.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id")
    i.add_argument("--json", action="store_true", help="print a machine-readable summary")
    i.add_argument("--v1-zeros", choices=["field", "word"], default=None, help="as for convert")
    return p


def _print_convert(s: dict[str, Any]) -> None:
    target = {"gptq": f"GPTQ ({s['checkpoint_format']})", "awq": "AWQ gemm",
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
    if s["verified"]:
        reader = s["for"] or "packq"
        print(f"  verified: every module dequantizes, as {reader} reads it, to the same bits as the source")
    print(f"  wrote {s['dst']} in {s['seconds']:.2f} s ({s['backend']} backend)")


def _print_inspect(s: dict[str, Any]) -> None:
    print(f"{s['path']}: {s['format']}")
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
                   else f"WRONG in {e['pairs']} pairs")
        where = f" ({', '.join(e['modules'][:3])}{', ...' if len(e['modules']) > 3 else ''})" if e["modules"] else ""
        print(f"    {name:<13} {verdict}{where}: {e['note']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            from packq.checkpoint import convert_checkpoint

            summary = convert_checkpoint(
                args.src, args.dst, to=args.to, checkpoint_format=args.checkpoint_format, backend=args.backend,
                verify=args.verify, force=args.force, progress=False if (args.no_progress or args.json) else None,
                v1_zeros=args.v1_zeros, for_engine=args.for_engine, allow_inexact=args.allow_inexact,
                revision=args.revision,
            )
            print(json.dumps(summary, indent=2)) if args.json else _print_convert(summary)
        elif args.command == "formats":
            from packq.checkpoint.formats import table_markdown

            print(table_markdown(), end="")
        else:
            from packq.checkpoint import inspect_checkpoint

            summary = inspect_checkpoint(args.src, v1_zeros=args.v1_zeros, revision=args.revision)
            print(json.dumps(summary, indent=2)) if args.json else _print_inspect(summary)
    except CheckpointError as e:
        print(f"packq: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the library names files in its errors; this is the last net
        print(f"packq: error: {describe(e, getattr(args, 'dst', args.src))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("packq: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
