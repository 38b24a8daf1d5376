"""The one renderer of benchmark results (tests/benchmarks/render.py): the summaries committed beside the result files
are exactly its output, a benchmark's summary names its file, and the module stays light enough for MkDocs to import
at every build (docs/hooks.py shows the same blocks: tests/unit/test_docs_site.py)."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.benchmarks import render

RESULT_FILES = sorted(render.RESULTS.glob("*.json"))
REWRITE = "run: python -m tests.benchmarks.render  (rewrites every summary from its JSON)"


def test_every_kind_of_result_is_here():
    kinds = {render.kind(p.name, json.loads(p.read_text())) for p in RESULT_FILES}
    assert kinds == set(render.RENDERERS)


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_committed_summary_is_the_render_of_its_json(path):
    d = json.loads(path.read_text())
    md = path.with_suffix(".md")
    if render.kind(path.name, d) in render.NO_SUMMARY:
        assert not md.exists(), f"{md.name}: its benchmark writes no summary"
        return
    assert md.is_file(), REWRITE
    assert md.read_text() == render.document(path.name, d), REWRITE
    # What the summary opens with: the title, then the command and the commit the numbers were recorded with.
    lines = md.read_text().splitlines()
    assert lines[0] == f"# {render.TITLES[render.kind(path.name, d)]}"
    assert lines[2] == f"- **Command:** `{d['command'].strip()}`"
    assert lines[3].startswith(f"- **Commit:** `{render.commit_of(d)}`")


def test_every_summary_has_its_result_file():
    for md in render.RESULTS.glob("*.md"):
        assert md.with_suffix(".json").is_file(), f"{md.name} has no {md.stem}.json"


def test_nothing_to_rewrite(capsys):
    assert render.main(["--check"]) == 0
    assert capsys.readouterr().out == ""


def test_a_summary_names_where_its_file_is_and_a_stale_one_is_rewritten(tmp_path):
    src = render.RESULTS / "infer-incremental.json"
    path = tmp_path / src.name
    shutil.copy(src, path)
    d = json.loads(path.read_text())
    md = render.write_summary(path, d)
    assert path.with_suffix(".md").read_text() == md == render.document(path.name, d, str(path))
    assert f"- **File:** `{path}`" in md
    path.with_suffix(".md").write_text("stale\n")
    assert render.main(["--check", str(tmp_path)]) == 1
    assert path.with_suffix(".md").read_text() == "stale\n", "--check writes nothing"
    assert render.main([str(tmp_path)]) == 0
    assert path.with_suffix(".md").read_text() == md


def test_a_file_of_an_unknown_kind_still_shows_its_provenance():
    d = {"benchmark": "something-new", "command": "python -m tests.benchmarks.new", "git": {"commit": "0" * 40}}
    md = render.document("something-new.json", d)
    assert md.startswith("# something-new\n\n- **Command:** `python -m tests.benchmarks.new`\n")
    assert "(no table for this kind of result: the file holds the numbers)" in md


def test_the_renderer_imports_the_standard_library_only():
    """MkDocs loads it at every build (docs/hooks.py, by its path): nothing heavy, nothing of the repository."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('r', {str(render.__file__)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in "
        "('torch', 'faiss', 'pyspark', 'pandas', 'numpy', 'pyarrow', 'deltalake', 'userformer', 'tests'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
