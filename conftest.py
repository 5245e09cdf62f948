"""The Markdown doctests (README.md and docs/**/*.md, collected by --doctest-glob) run from the repository
root, where their paths (examples/tiny-llama-awq) lead, wherever pytest was started. The test suite's own
fixtures are in tests/conftest.py (a second conftest.py under docs/ would clash with it by name)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
collect_ignore = ["docs/conf.py"]  # Sphinx's configuration: nothing to test, and it edits sys.path


@pytest.fixture(autouse=True)
def _docs_at_the_repository_root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path(request.node.path).suffix == ".md":
        monkeypatch.chdir(REPO)
