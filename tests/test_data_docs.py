"""docs/data.md's Python examples run as written and print what their comments say."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_docs_have_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = BLOCKS[index]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, f"docs/data.md example {index}", "exec"), {"__name__": "__main__"})
    printed = output.getvalue().splitlines()
    assert printed, "the example prints nothing to check"
    for line in printed:
        assert f"# {line}" in block, f"prints {line!r}, which its comments do not show"
