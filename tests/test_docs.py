"""Every example in README.md and docs/*.md runs as written, so none goes stale.

The convention (docs/docs-examples.md says it for writers):

- A block tagged ``python``, ``bash``, ``sh``, ``shell`` or ``console`` is an example: it runs,
  in page order, in one temporary folder per page that holds the repository's ``data/``,
  ``configs/`` and ``scripts/``, so a block can use what an earlier block of the page wrote.
- ``<!-- not-run: reason -->`` on the line(s) just above a block: the block does not run; the
  reason (a GPU, SLURM, the hub, real datasets, minutes of compute) is required. ``console``
  transcripts can only be shown this way.
- There is no marker that rewrites a block for the test: a block runs as it is shown, so an
  example that would take too long shows its short budget itself (``--trainer.max_epochs 2``).
- ``<!-- output-in-comments -->``: every line the Python block prints appears in it as
  ``# <line>``.
- Other blocks hold data or output and must say so: ``text``, ``yaml`` and ``json`` (the last
  two must parse). A block with no tag, or another tag, fails the test.

Shell lines run in this process where they call ``wegeft-vision`` or ``python``, which spares the
seconds of imports per command; a line with pipes or redirections, another program, or a DDP run
(which starts processes of its own) runs in a real shell with this environment's ``bin`` first on
PATH. ``wegeft-vision fit/validate/test/predict`` lines run with at most 3 batches per loop
(``FEW_BATCHES``): every option the example names is still parsed and used.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RUN_TAGS = {"python", "bash", "sh", "shell", "console"}
DATA_TAGS = {"text", "yaml", "json"}
SHARED = ("data", "configs", "scripts")
SHELL_SYNTAX = re.compile(r"[|&;<>`]|\$\(")
# Appended to the training commands the examples run: a few batches per loop exercise every
# option an example names (what goes stale) at a fraction of the time. Epochs stay as written.
FEW_BATCHES = [f"--trainer.limit_{loop}_batches=3" for loop in ("train", "val", "test", "predict")]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    tag: str
    code: str
    markers: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"

    def marker(self, name: str) -> str | None:
        for marker in self.markers:
            if marker == name or marker.startswith(name + ":"):
                return marker[len(name) + 1:].strip()
        return None

    @property
    def not_run(self) -> str | None:
        return self.marker("not-run")


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


def parse_blocks(page: Path) -> list[Block]:
    """Fenced blocks with the HTML-comment markers on the lines just above them."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, tag = opening.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{_rel(page)}:{i + 1}: code block never closed")
        markers, j = [], i - 1
        while j >= 0 and re.match(r"^\s*<!--.*-->\s*$", lines[j]):
            markers.insert(0, re.sub(r"^\s*<!--\s*|\s*-->\s*$", "", lines[j]))
            j -= 1
        code = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"
        blocks.append(Block(page, i + 1, tag.lower(), code, markers))
        i = end + 1
    return blocks


BLOCKS = {page: parse_blocks(page) for page in PAGES}
PAGE_IDS = [_rel(page) for page in PAGES]


def test_pages_exist_and_have_examples():
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    for needed in ("README.md", "docs/index.md", "docs/getting-started.md", "docs/method.md",
                   "docs/library.md", "docs/api.md", "docs/cli.md", "docs/data.md",
                   "docs/protocols.md", "docs/demo.md", "docs/docs-examples.md"):
        assert needed in names, f"{needed} is missing"
    running = [b for blocks in BLOCKS.values() for b in blocks
               if b.tag in RUN_TAGS and b.not_run is None]
    assert len(running) >= 20, f"only {len(running)} examples run: the docs lost their examples"


def page_problems(blocks: list[Block]) -> list[str]:
    """What breaks the rules of docs/docs-examples.md in a page's blocks."""
    problems = []
    for block in blocks:
        if block.tag in RUN_TAGS:
            reason = block.not_run
            if reason is not None and not reason:
                problems.append(f"{block.where}: not-run needs a reason")
            if block.tag == "console" and reason is None:
                problems.append(f"{block.where}: a console transcript cannot run: mark it "
                                "<!-- not-run: reason --> or make it a bash block")
        elif block.tag in DATA_TAGS:
            if block.not_run is not None:
                problems.append(f"{block.where}: a {block.tag} block is never run: drop the "
                                "marker")
            try:
                if block.tag == "yaml":
                    yaml.safe_load(block.code)
                elif block.tag == "json":
                    json.loads(block.code)
            except (yaml.YAMLError, json.JSONDecodeError) as err:
                problems.append(f"{block.where}: the {block.tag} block does not parse: {err}")
        else:
            problems.append(f"{block.where}: block tagged {block.tag or '(nothing)'!r}: tag it "
                            f"{sorted(RUN_TAGS)} (an example, run by the tests) or "
                            f"{sorted(DATA_TAGS)} (data or output)")
        unknown = [m for m in block.markers
                   if m.split(":")[0] not in ("not-run", "output-in-comments")]
        if unknown:
            problems.append(f"{block.where}: unknown marker(s) {unknown}"
                            + ("; a block runs as shown: write its short budget into it"
                               if any(m.startswith("test-with") for m in unknown) else ""))
        if block.marker("output-in-comments") is not None and block.tag != "python":
            problems.append(f"{block.where}: output-in-comments applies to python blocks")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_block_is_run_or_marked(page):
    """The rule that keeps examples honest: code runs, or says why not; data says it is data."""
    problems = page_problems(BLOCKS[page])
    assert not problems, "\n".join(problems)


def test_the_parser_sees_markers_and_the_rules_reject_rewrites_and_untagged_blocks(tmp_path):
    """The checks above would pass vacuously if the parser missed blocks or markers."""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        Text.

        <!-- not-run: needs a GPU -->
        ```bash
        wegeft-vision fit --trainer.accelerator gpu
        ```

        <!-- test-with: "--trainer.max_epochs 50" -> "--trainer.max_epochs 1" -->
        ```bash
        wegeft-vision fit --trainer.max_epochs 1
        ```

        - In a list:

          ```
          untagged
          ```
        """))
    blocks = parse_blocks(page)
    assert [(b.tag, b.line) for b in blocks] == [("bash", 4), ("bash", 9), ("", 15)]
    assert blocks[0].not_run == "needs a GPU" and blocks[1].not_run is None
    assert blocks[1].code == "wegeft-vision fit --trainer.max_epochs 1\n"
    assert blocks[2].code == "untagged\n"
    # A block runs as shown: a marker that would rewrite it for the test is refused.
    assert page_problems(blocks) == [
        f"{_rel(page)}:9: unknown marker(s) ['test-with: \"--trainer.max_epochs 50\" -> "
        "\"--trainer.max_epochs 1\"']; a block runs as shown: write its short budget into it",
        f"{_rel(page)}:15: block tagged '(nothing)': tag it {sorted(RUN_TAGS)} (an example, run "
        f"by the tests) or {sorted(DATA_TAGS)} (data or output)"]


def test_api_page_lists_every_public_module():
    """docs/api.md documents the package module by module: each public module (no part of its
    dotted name starts with "_"; packages document themselves through their modules) has one
    ``::: name`` entry, and each entry names a module that exists."""
    import pkgutil

    import wegeft_vision

    modules = {m.name for m in pkgutil.walk_packages(wegeft_vision.__path__, "wegeft_vision.")
               if not m.ispkg and not any(p.startswith("_") for p in m.name.split("."))}
    page = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    listed = re.findall(r"^::: (\S+)\s*$", page, flags=re.MULTILINE)
    assert len(listed) == len(set(listed)), "docs/api.md lists a module twice"
    assert not modules - set(listed), f"docs/api.md leaves out {sorted(modules - set(listed))}"
    unknown = sorted(set(listed) - modules)
    assert not unknown, f"docs/api.md lists no such module: {unknown}"


# ---------------------------------------------------------------------------------------------
# Running the examples


def _shell_lines(code: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _bin_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@contextlib.contextmanager
def _argv_env(argv: list[str], env: dict[str, str]):
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in env}
    sys.argv = argv
    os.environ.update(env)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_ok(run, what: str) -> None:
    try:
        run()
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise AssertionError(f"{what} exited with status {exit_.code}") from exit_


def run_shell_line(line: str, where: str) -> None:
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    program = Path(words[0]).name if words else ""
    in_process = (not SHELL_SYNTAX.search(line) and "ddp" not in words
                  and (program == "wegeft-vision"
                       or (program in ("python", "python3") and len(words) > 1
                           and words[1] != "-m")))
    if not in_process:
        result = subprocess.run(["bash", "-ec", line], capture_output=True, text=True,
                                timeout=600, env={**os.environ, "PATH": _bin_path()})
        assert result.returncode == 0, (f"{where}: `{line}` failed ({result.returncode}):\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return
    what = f"{where}: `{line}`"
    if program == "wegeft-vision":
        from wegeft_vision.cli import main
        args = words[1:]
        if args[:1] in (["fit"], ["validate"], ["test"], ["predict"]):
            args += FEW_BATCHES
        with _argv_env(["wegeft-vision", *args], env):
            _exit_ok(main, what)
    elif words[1] == "-c":
        with _argv_env(["-c", *words[3:]], env):
            _exit_ok(lambda: exec(compile(words[2], "<python -c>", "exec"),
                                  {"__name__": "__main__"}), what)
    else:
        script = Path(words[1]).resolve()
        sys.path.insert(0, str(script.parent))  # as `python script.py` puts the script's folder first
        try:
            with _argv_env([words[1], *words[2:]], env):
                _exit_ok(lambda: runpy.run_path(str(script), run_name="__main__"), what)
        finally:
            sys.path.remove(str(script.parent))


def run_python_block(block: Block) -> None:
    code = block.code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), _argv_env([block.where], {}):
        _exit_ok(lambda: exec(compile(code, block.where, "exec"), {"__name__": "__main__"}),
                 block.where)
    if block.marker("output-in-comments") is not None:
        lines = printed.getvalue().splitlines()
        assert lines, f"{block.where}: the example prints nothing to check"
        for line in lines:
            assert f"# {line}" in code, (f"{block.where}: prints {line!r}, which its comments "
                                         "do not show")


RUNNABLE = [(page, [b for b in BLOCKS[page] if b.tag in RUN_TAGS and b.not_run is None])
            for page in PAGES]
RUNNABLE = [(page, blocks) for page, blocks in RUNNABLE if blocks]


@pytest.mark.parametrize("page, blocks", RUNNABLE,
                         ids=[_rel(p) for p, _ in RUNNABLE])
def test_page_examples_run(page, blocks, tmp_path, monkeypatch):
    for shared in SHARED:
        (tmp_path / shared).symlink_to(REPO / shared)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for block in blocks:
        if block.tag == "python":
            run_python_block(block)
        else:
            for line in _shell_lines(block.code):
                run_shell_line(line, block.where)


# ---------------------------------------------------------------------------------------------
# The README: short, the CI's commands, and numbers that come from the measured files


README = (REPO / "README.md").read_text(encoding="utf-8")
SETUP = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"'
TESTS = ".venv/bin/python -m pytest"


def test_readme_is_short_and_links_into_the_docs():
    assert len(README.splitlines()) <= 220, "README.md should stay a one-screen overview"
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README)
    assert len(set(links)) >= 10, "README.md should link the documentation pages"
    missing = [link for link in links if not (REPO / link).is_file()]
    assert not missing, f"README.md links pages that do not exist: {missing}"


def test_readme_setup_is_what_ci_runs():
    """CI builds its environment with the README's own set-up line: they must not drift."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in (SETUP, TESTS):
        assert command in README, f"README.md lost the command {command!r}"
        assert command in ci, f".ci/run no longer runs {command!r}"


def _table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"README.md has no table row for {first_cell!r}")


def test_readme_parameter_counts_are_counted():
    from tests.helpers.models import vit_b16_on_meta
    from wegeft_vision import LoRAConfig, WeGeFTConfig, apply_adapter, count_parameters

    rows = {"WeGeFT r = 16, one generator shared by the 12 blocks":
            WeGeFTConfig(rank=16, targets="attn.proj", shared=True),
            "LoRA r = 8, one pair per block": LoRAConfig(rank=8, targets="attn.proj")}
    for label, config in rows.items():
        model = apply_adapter(vit_b16_on_meta(num_classes=100), config)
        count = count_parameters(model)
        assert _table_row(README, label)[1:] == [f"{count.trainable:,}",
                                                 f"{count.percent:.3f} %"], label


def _first_table(text: str) -> list[str]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line.strip())
        elif rows:
            break
    return rows


def test_readme_demo_numbers_are_the_measured_ones():
    """The README's demo table is the one scripts/compare_demo.py wrote, row for row, and agrees
    with the JSON it writes beside it where that exists."""
    measured = _first_table((REPO / "docs" / "demo_comparison.md").read_text(encoding="utf-8"))
    assert len(measured) >= 4, "docs/demo_comparison.md lost its table"
    readme_lines = [line.strip() for line in README.splitlines()]
    stale = [row for row in measured if row not in readme_lines]
    assert not stale, f"README.md's demo table differs from docs/demo_comparison.md: {stale}"
    path = REPO / "docs" / "demo_comparison.json"
    if not path.is_file():
        return
    numbers = json.loads(path.read_text(encoding="utf-8"))
    shots = [str(k) for k in numbers["shots"]]
    for name, method in numbers["methods"].items():
        row = _table_row(README, name)
        cells = [method["shots"][k] for k in shots]
        assert row[1] == f"{method['trainable_params']:,} + head {method['head_params']:,}", name
        assert row[2:] == [f"{c['mean']:.1f} ± {c['std']:.1f}" for c in cells], (
            f"README's demo row {name!r} differs from docs/demo_comparison.json")


def _benchmark_run(model: str, targets: list[str]) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_figures import benchmark_runs
    finally:
        sys.path.remove(str(REPO / "scripts"))
    path = REPO / "docs" / "benchmark.json"
    runs = [run for run in benchmark_runs(json.loads(path.read_text(encoding="utf-8")), path)
            if run["args"]["model"] == model and list(run["args"]["targets"]) == targets]
    assert runs, f"docs/benchmark.json has no run of {model} with targets {targets}"
    return runs[-1]


def test_readme_performance_numbers_are_the_measured_ones():
    """The README's headline ratios are recomputed from docs/benchmark.json the way
    scripts/benchmark.py computes its tables (medians of per-round CPU-time ratios); before that
    file exists they must be the ones in docs/performance.md's tables."""
    import statistics

    assert "vit_small_patch16_224" in README and "all four projections" in README
    step = _table_row(README, "training step (CPU time)")[1:]
    saved = _table_row(README, "activations saved for backward")[1:]
    if not (REPO / "docs" / "benchmark.json").is_file():
        page = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
        row = _table_row(page, "wegeft")  # the first table: vit_small, all four projections
        assert [v.rstrip("x") for v in step + saved] == [row[6], row[5], row[10], row[9]], (
            "README's ratios are not docs/performance.md's first WeGeFT row "
            "(x LoRA, x floor for time; x LoRA, x floor for saved activations)")
        return
    run = _benchmark_run("vit_small_patch16_224", ["all"])
    times, memory = run["step_cpu_s"], run["memory_bytes"]

    def ratio(name: str, ref: str) -> str:
        return f"{statistics.median(a / b for a, b in zip(times[name], times[ref])):.3f}x"

    assert step == [ratio("wegeft", "lora"), ratio("wegeft", "floor")]
    assert saved == [f"{memory['wegeft'] / memory['lora']:.3f}x",
                     f"{memory['wegeft'] / memory['floor']:.3f}x"]
