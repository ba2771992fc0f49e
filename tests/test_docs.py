"""Every example of the documentation runs: README.rst, docs/**/*.rst and the
docstring examples of the three packages.

* ``>>>`` examples (doctest blocks) are run by :mod:`doctest` and their shown
  output is compared (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``);
* ``.. code-block:: python`` blocks are executed in order in the same
  namespace as the file's doctests and must print nothing (output is shown
  only in ``>>>`` form);
* ``.. code-block:: text`` / ``bash`` / ``console`` blocks are not run.

Each file runs in a fresh temporary working directory, so examples may write
files.  When Sphinx is installed (``pip install ".[docs]"``) the site is also
built with ``-W`` (warnings are errors).
"""
from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.rst"] + sorted((ROOT / "docs").rglob("*.rst"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Docstring examples of modules this helper does not own that do not run as
# written; each is excluded by name with the reason, and reported to the lead.
DOCSTRING_SKIPS: Dict[str, str] = {
}

_BLOCK = re.compile(r"^\.\. code-block::\s*(\w+)\s*$")


def segments(text: str) -> List[Tuple[str, int, str]]:
    """Split an rst file into ``(kind, line, text)``: kind ``"python"`` for a
    python code block (dedented), ``"rst"`` for everything else, and
    ``"skip"`` for code blocks in another language."""
    lines = text.splitlines()
    out, buf, start, i = [], [], 1, 0
    while i < len(lines):
        m = _BLOCK.match(lines[i].strip()) if not lines[i].startswith(" ") else None
        if m is None:
            buf.append(lines[i])
            i += 1
            continue
        out.append(("rst", start, "\n".join(buf) + "\n"))
        lang, first, i = m.group(1), i + 1, i + 1
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
            body.append(lines[i])
            i += 1
        out.append(("python" if lang == "python" else "skip", first + 1,
                    textwrap.dedent("\n".join(body)).strip() + "\n"))
        buf, start = [], i + 1
    out.append(("rst", start, "\n".join(buf) + "\n"))
    return out


def run_file(path: Path) -> Tuple[int, int]:
    """Run every example of one rst file; returns (doctest examples, code blocks)."""
    globs: Dict[str, object] = {"__name__": f"doc_{path.stem}"}
    parser, n_doctest, n_blocks = doctest.DocTestParser(), 0, 0
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    rel = path.relative_to(ROOT)
    for kind, line, text in segments(path.read_text()):
        if kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(text, f"{rel}:{line}", "exec"), globs)
            assert out.getvalue() == "", (
                f"{rel}:{line}: a code-block printed output; show it as a >>> example instead:\n"
                f"{out.getvalue()}")
            n_blocks += 1
        elif kind == "rst":
            test = parser.get_doctest(text, globs, f"{rel}", str(rel), line - 1)
            if test.examples:
                out = io.StringIO()
                result = runner.run(test, out=out.write, clear_globs=False)
                assert result.failed == 0, out.getvalue()
                n_doctest += result.attempted
    return n_doctest, n_blocks


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_doc_file_examples_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))    # the CLI puts the cwd on it; undo after
    n_doctest, n_blocks = run_file(path)
    if path.name == "README.rst":
        assert n_doctest >= 10          # the README's quick start and tutorial are examples


def _modules() -> List[str]:
    names = []
    for pkg in ("nimplicit", "reference_layers", "verification"):
        mod = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=pkg + "."):
            names.append(info.name)
    return names


def _docstring_tests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError:          # an optional extra (torch, jax) is absent
            continue
        for t in finder.find(module):
            if t.examples and t.name.startswith(name):
                tests.append(t)
    return tests


DOCSTRING_TESTS = _docstring_tests()


@pytest.mark.parametrize("test", DOCSTRING_TESTS, ids=[t.name for t in DOCSTRING_TESTS])
def test_docstring_examples_run(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    result = doctest.DocTestRunner(optionflags=FLAGS).run(test, out=out.write)
    if test.name in DOCSTRING_SKIPS:
        assert result.failed, f"{test.name} now runs: remove it from DOCSTRING_SKIPS"
        pytest.skip(f"{test.name}: {DOCSTRING_SKIPS[test.name]} (reported; the module is not ours)")
    assert result.failed == 0, out.getvalue()


def test_rst_parser_sees_blocks_and_doctests():
    text = "Intro\n\n.. code-block:: python\n\n    x = 1\n\n>>> x + 1\n2\n\n.. code-block:: bash\n\n    ls\n"
    kinds = [k for k, _, _ in segments(text)]
    assert kinds == ["rst", "python", "rst", "skip", "rst"]
    assert segments(text)[1][2] == "x = 1\n"


def test_sphinx_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="the docs extra is not installed")
    pytest.importorskip("numpydoc", reason="the docs extra is not installed")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs"), str(tmp_path / "html")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "html" / "index.html").exists()


@pytest.mark.parametrize("quiet", [[], ["-q"]], ids=["plain", "-q"])
def test_per_suite_commands_print_their_summary(quiet):
    """pytest.ini's addopts must not stack with a command's -q into silence."""
    proc = subprocess.run([sys.executable, "-m", "pytest", *quiet,
                           "tests/test_docs.py::test_rst_parser_sees_blocks_and_doctests"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^=*\s*1 passed", proc.stdout, re.M), proc.stdout


def test_readme_stays_short_and_links_existing_pages():
    text = (ROOT / "README.rst").read_text()
    assert len(text.splitlines()) <= 200
    for page in re.findall(r"``(docs/[\w/]+\.rst)``", text):
        assert (ROOT / page).exists(), page


def test_generated_results_pages_match_the_results_files():
    """docs/_generated/*.rst are what ``python -m examples.report`` renders from the
    newest results files now: a results file changed without re-rendering (or a page
    edited by hand) fails here.  Fix: ``python -m examples.report`` and commit."""
    from examples import report
    for name, text in report.generated().items():
        path = ROOT / "docs" / "_generated" / name
        assert path.exists(), f"{path} is missing: run python -m examples.report"
        assert path.read_text() == text, (
            f"docs/_generated/{name} is stale (it differs from the results files): "
            f"run python -m examples.report")
    for page in ("experiments.rst", "benchmarks.rst"):          # the pages include them
        assert f".. include:: _generated/{page}" in (ROOT / "docs" / page).read_text()
