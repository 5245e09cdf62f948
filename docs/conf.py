"""Sphinx configuration of packq's documentation site.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` (warnings are errors, as in CI:
tests/test_docs.py). Pages are Markdown (MyST); the API reference comes from packq's numpydoc docstrings.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import packq  # noqa: E402

project = "packq"
author = "the packq authors"
copyright = "the packq authors, Apache-2.0"
version = release = packq.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "packq_docs",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]
# index.md's toctrees take new pages in docs/ and docs/formats/ by glob; until there are some, the globs match nothing
suppress_warnings = ["toc.empty_glob"]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3  # links to a page's sections by their slugs: [guarantees](guarantees.md#srcs-never-written)

# Broken cross-references are errors (-n in CI); names of other libraries' types are not ours to resolve
# (no intersphinx: the build must work offline), so they are listed here, and nothing of packq's.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|jax|jnp|torch|array_api_compat|os|collections\.abc|typing)(\..*)?"),
    (r"py:.*", r"(Array|ArrayLike|Namespace|Any|Callable|Mapping|Sequence|Sharding|PathLike|optional|default)"),
    (r"py:class", r"(int|str|bool|float|dict|list|tuple|None|bytes|object)(\s*\|.*)?"),
]

autodoc_typehints = "none"  # the numpydoc Parameters sections say the types, in words users read
autodoc_member_order = "bysource"
autosummary_generate = False  # summary tables link to the entries on the same page; no stub files written
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# "--for" stays two hyphens and quotes stay straight: the pages are full of options and code
smartquotes = False

html_theme = "alabaster"
html_title = f"packq {release}"
html_theme_options = {"description": "Packed integer formats of quantized LLM weights, exact and framework-neutral.",
                      "fixed_sidebar": True, "page_width": "1140px", "sidebar_width": "240px"}
html_static_path: list[str] = []
html_copy_source = False
