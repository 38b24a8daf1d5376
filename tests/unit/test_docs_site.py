"""The documentation site's generated parts (docs/hooks.py): the measured results come from their files, each with its
command and commit, rendered by the renderer that writes the summaries beside them (tests/benchmarks/render.py); the
sweeps under experiments/ agree with the result files they cite; the design page's flowchart is the day's real step
order and tables; the nav holds every page."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.benchmarks import render
from userformer.jobs.core.config import load_config
from userformer.jobs.core.ledger import STEPS
from userformer.schemas.tables import TABLES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("userformer_docs_hooks", DOCS / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hooks = _hooks()
RESULT_FILES = sorted((ROOT / "tests" / "benchmarks" / "results").glob("*.json"))
SWEEPS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/results.json"))


@pytest.fixture(scope="module")
def measured() -> str:
    return hooks.render_measured((DOCS / "measured.md").read_text())


def test_there_is_something_to_render():
    assert len(RESULT_FILES) >= 8 and len(SWEEPS) >= 3


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_measured_page_shows_every_result_file_with_its_command_and_commit(measured, path):
    d = json.loads(path.read_text())
    assert d.get("command") and render.commit_of(d), f"{path.name} lacks its command or commit"
    # Its own block: the provenance lines, then the numbers.
    block = measured.split(f"- **File:** `tests/benchmarks/results/{path.name}`")
    assert len(block) == 2, f"{path.name} is not rendered exactly once"
    head = block[0].rsplit("- **Command:**", 1)[1]
    assert f"`{d['command'].strip()}`" in head
    assert f"`{render.commit_of(d)}`" in head
    assert f"`{path.name}`" in measured.split("## Every result file")[1]


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_measured_page_blocks_are_the_renderers(measured, path):
    """The page shows each file as render.py renders it: the same block as in the summary written beside it."""
    d = json.loads(path.read_text())
    block = render.block(path.name, d)
    assert block in measured
    assert block in render.document(path.name, d)


def test_measured_page_numbers_are_the_files(measured):
    throughput = json.loads((ROOT / "tests/benchmarks/results/pipeline-throughput.json").read_text())
    for r in throughput["results"]:
        assert f"| {r['events_raw']:,} | ingest | {r['steps']['ingest']['median_s']:,.1f} |" in measured
    beauty = json.loads((ROOT / "tests/benchmarks/results/quality-beauty.json").read_text())
    full = beauty["models"]["full"]
    assert f"| full model | {full['hr@10']:.4f} | {full['ndcg@10']:.4f} |" in measured
    incremental = json.loads((ROOT / "tests/benchmarks/results/pipeline-incremental.json").read_text())
    assert f"Ratio incremental / rebuild: {incremental['results'][0]['ratio_incremental_to_rebuild']:.2f}" in measured


def test_every_marker_is_replaced(measured):
    assert "<!--" not in measured
    assert "EXPERIMENT" not in measured and "RESULT-INDEX" not in measured


def test_a_file_without_command_or_commit_says_so():
    d = {"benchmark": "something-new", "results": []}
    out = hooks.render_result("something-new.json", {"something-new.json": d})
    assert "- **Command:** not recorded in the file" in out
    assert "- **Commit:** not recorded in the file" in out
    index = hooks.render_index({"something-new.json": d})
    assert "| `something-new.json` | not recorded | not recorded | not recorded |" in index


def test_a_result_file_the_page_does_not_render_stops_the_build():
    results = hooks.load_results()
    results["extra.json"] = {"command": "python -m tests.benchmarks.extra", "git": {"commit": "0" * 40}}
    with pytest.raises(hooks.DocsError, match="extra.json"):
        hooks.render_measured((DOCS / "measured.md").read_text(), results)
    with pytest.raises(hooks.DocsError, match="missing.json"):
        hooks.render_measured("<!-- RESULT missing.json -->\n", results)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeps_agree_with_their_configs_and_result_files(name):
    folder = ROOT / "experiments" / name
    sweep = json.loads((folder / "results.json").read_text())
    assert sweep["sweep"] == name
    assert "commit" in sweep and (sweep["commit"] or sweep["commit_note"])
    assert hooks.check_sweep(sweep) == []
    configs = {r["config"] for r in sweep["runs"]}
    assert configs == {p.name for p in folder.glob("*.toml")}, "a TOML no run uses, or a run without its TOML"
    for cfg in configs:
        load_config(folder / cfg, env={})  # valid keys and values of infra/config/userformer.toml
    for run in sweep["runs"]:
        assert run["command"], run["name"]
        assert set(run["results"]) <= {*sweep["metrics"], *(f"{k}_std" for k in sweep["metrics"])}
        if run["commit"] is None:
            assert not run.get("source"), f"{run['name']}: a result file has a commit"
        assert re.fullmatch(r"[0-9a-f]{40}", run["commit"] or "0" * 40)


def test_a_sweep_number_that_disagrees_with_its_file_is_caught():
    sweep = json.loads((ROOT / "experiments/beauty-negatives/results.json").read_text())
    sourced = next(i for i, r in enumerate(sweep["runs"]) if r.get("source"))
    wrong = copy.deepcopy(sweep)
    wrong["runs"][sourced]["results"]["test_hr@10"] += 0.01
    assert any("test_hr@10" in p for p in hooks.check_sweep(wrong))
    wrong = copy.deepcopy(sweep)
    wrong["runs"][sourced]["commit"] = "f" * 40
    assert any("commit" in p for p in hooks.check_sweep(wrong))


def test_a_sweep_config_that_disagrees_with_its_file_is_caught(tmp_path, monkeypatch):
    sweep = json.loads((ROOT / "experiments/beauty-negatives/results.json").read_text())
    run = next(r for r in sweep["runs"] if r.get("source"))
    folder = tmp_path / sweep["sweep"]
    folder.mkdir()
    for p in (ROOT / "experiments" / sweep["sweep"]).glob("*.toml"):
        (folder / p.name).write_text(p.read_text())
    (folder / run["config"]).write_text((folder / run["config"]).read_text() + "\n[model]\nn_layers = 3\n")
    monkeypatch.setattr(hooks, "EXPERIMENTS", tmp_path)
    assert any("model.n_layers=3" in p for p in hooks.check_sweep(sweep))


def _flowchart() -> str:
    design = (DOCS / "design.md").read_text()
    blocks = hooks.MERMAID.findall(design)
    assert len(blocks) == 1, "the design page has one diagram"
    return blocks[0]


def test_design_flowchart_is_the_days_steps_and_tables():
    nodes, chain, writes = hooks.parse_flowchart(_flowchart())
    steps = [n for n in chain if nodes[n][0] in ("step", "check")]
    assert steps == STEPS, "the diagram's steps are jobs/core/ledger.py STEPS, in order"
    tables = {label for shape, label in nodes.values() if shape == "table"}
    assert tables == set(TABLES), "every Delta table of schemas/tables.py, nothing else"
    writers = {b: a for a, b in writes if nodes[b][0] == "table"}
    assert writers == {
        "events": "ingest",
        "events_rejected": "ingest",
        "vocab": "ingest",
        "items": "ingest",
        "user_sequences": "sequences",
        "user_embeddings": "publish",
        "user_preference_scores": "publish",
        "item_embeddings": "publish",
        "user_candidates": "candidates",
    }
    assert {a for a, _ in writes if nodes[a][0] == "check"} == {"gate"}, "of the gates only `gate` writes (PUBLISHED)"


def test_design_flowchart_is_drawn_as_svg():
    src = _flowchart()
    nodes, _, _ = hooks.parse_flowchart(src)
    svg = hooks.flowchart_svg(src)
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "\n" not in svg
    for _, label in nodes.values():
        assert f">{label}</text>" in svg.replace("&#x27;", "'")
    with pytest.raises(hooks.DocsError):
        hooks.parse_flowchart("flowchart TD\n    a --> b\n")  # undeclared nodes


def test_nav_holds_every_page_once():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = [next(iter(item.values())) for item in nav]
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md"))
    assert len(set(pages)) == len(pages)
    assert pages[0] == "index.md" and pages[-1] == "measured.md"
