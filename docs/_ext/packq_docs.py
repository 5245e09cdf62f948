"""Sphinx glue for packq's site: refuse stale generated tables, and write the CLI reference from the parser.

Both run on ``source-read``, before a page is parsed: a generated block that differs from its function's
output now is a warning (an error under ``-W``), and the page's ``<!-- cli-reference -->`` marker becomes
the reference made from ``packq.cli._parser()`` (docs/generate.py says how).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402  (docs/generate.py, beside this folder)

logger = logging.getLogger(__name__)


def _source_read(app, docname: str, source: list[str]) -> None:
    text = source[0]
    for name, body, fresh in generate.blocks(text):
        if body != fresh:
            logger.warning(f"generated block {name}() differs from its output now: run python docs/generate.py",
                           location=docname)
    if generate.CLI_MARKER in text:
        source[0] = text.replace(generate.CLI_MARKER, generate.cli_markdown())


def setup(app):
    app.connect("source-read", _source_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
