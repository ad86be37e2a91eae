"""The README's Python examples run as written, from a folder that has the repo's data/ and
configs/, and the data examples print exactly what their comments say."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SECTIONS = re.split(r"\n(?=## )", README)
EXAMPLES = [(section.splitlines()[0], block) for section in SECTIONS
            for block in re.findall(r"```python\n(.*?)```", section, flags=re.S)]
# Sections whose examples document their output in comments: "print(x)  # <what it prints>".
CHECKED_OUTPUT = ("## Data",)


def test_readme_has_python_examples():
    assert len(EXAMPLES) >= 5, "README.md lost its Python examples"


@pytest.mark.parametrize("heading, block", EXAMPLES,
                         ids=[f"{i}-{h[3:20]}" for i, (h, _) in enumerate(EXAMPLES)])
def test_readme_python_example_runs(heading, block, tmp_path):
    for shared in ("data", "configs"):
        (tmp_path / shared).symlink_to(REPO / shared)
    script = tmp_path / "example.py"
    script.write_text(block)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    if heading.startswith(CHECKED_OUTPUT):
        printed = result.stdout.splitlines()
        assert printed, "the example prints nothing to check"
        for line in printed:
            assert f"# {line}" in block, f"prints {line!r}, which its comments do not show"
