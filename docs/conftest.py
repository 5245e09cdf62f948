"""The documentation's doctests (pytest --doctest-glob=*.md) run from the repository root, where the pages'
paths (examples/tiny-llama-awq) lead, wherever pytest was started."""

from __future__ import annotations

from pathlib import Path

import pytest

collect_ignore = ["conf.py"]  # Sphinx's configuration: nothing to test, and it edits sys.path


@pytest.fixture(autouse=True)
def _at_the_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
