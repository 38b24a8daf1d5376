"""The version store (jobs/core/versions.py) under the model registry and the item index: ids, allocation, the
pointer and its log, the pointer as of a time."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import re
import shutil

import pytest

from userformer.jobs.core import versions
from userformer.jobs.core.errors import UserError
from userformer.jobs.core.versions import VersionStore

ID = re.compile(r"^t(\d{4,})-([a-z]+)$")


def make_store(root) -> VersionStore:
    return VersionStore(
        root,
        ID,
        "CURRENT",
        "switch_log.jsonl",
        "test version",
        example="t0001-a",
        pointer_label="test pointer",
        pointer_fix="set it again",
        time_key="switched_at",
    )


def new(store: VersionStore, kind: str = "a", **fields) -> str:
    return store.allocate(lambda n: f"t{n:04d}-{kind}", **fields)[0]


def complete(store: VersionStore, version: str, **manifest) -> None:
    store.write_manifest(version, {"version": version, **manifest})


@pytest.fixture
def clock(monkeypatch):
    """Sets the time the store records: ``clock("2026-01-01T10:00:00+00:00")``."""

    def set_to(text: str) -> None:
        monkeypatch.setattr(versions, "now_iso", lambda: text)

    return set_to


# ----------------------------------------------------------------- ids
def test_bad_ids_are_rejected(tmp_path):
    s = make_store(tmp_path)
    for bad in ("t1-a", "x0001-a", "t0001-A", "../t0001-a", "", None, 7):
        assert not s.valid(bad)
        with pytest.raises(UserError, match=r"not a test version id: .* \(expected e\.g\. t0001-a\)"):
            s.path(bad)
    assert s.path("t0012-b") == tmp_path / "versions" / "t0012-b" and s.number("t0012-b") == 12
    with pytest.raises(UserError, match="not a test version id"):
        s.set_pointer("nope", {})
    with pytest.raises(UserError, match="not a test version id"):
        s.allocate(lambda n: f"v{n}")
    with pytest.raises(ValueError, match="not number 1"):
        s.allocate(lambda n: "t0005-a")


# ---------------------------------------------------------- allocation
def test_allocation_never_reuses_a_number(tmp_path):
    s = make_store(tmp_path)
    v1, d1 = s.allocate(lambda n: f"t{n:04d}-a", dt="2026-01-01")
    assert (v1, d1) == ("t0001-a", tmp_path / "versions" / "t0001-a") and d1.is_dir() and not list(d1.iterdir())
    line = json.loads(s.allocations_path.read_text().splitlines()[0])
    assert list(line) == ["version", "dt", "allocated_at"] and line["version"] == v1
    v2 = new(s, "b")
    assert v2 == "t0002-b"
    shutil.rmtree(s.path(v2))  # a deleted version: its number stays taken (INDEX.jsonl)
    assert new(s) == "t0003-a"
    s.allocations_path.write_text("")  # a lost log: the folders still count
    assert new(s) == "t0004-a"
    (s.versions_root / "t0009-z").mkdir()  # a folder a writer made without logging it
    assert new(s) == "t0010-a"
    with open(s.allocations_path, "a") as f:
        f.write("{torn\n" + json.dumps({"version": "t0020-a"}) + "\n")
    assert new(s) == "t0021-a"
    assert s.allocated()[-3:] == ["t0010-a", "t0020-a", "t0021-a"]


def _allocate_many(root, kind, start, count, out):
    s = make_store(root)
    start.wait()  # every process starts allocating at the same moment
    out.put([new(s, kind) for _ in range(count)])


def test_processes_allocating_at_once_get_distinct_numbers(tmp_path):
    """Ids of different kinds do not collide as folder names; the lock still keeps their numbers apart."""
    ctx = multiprocessing.get_context("spawn")
    kinds, count = ["a", "b", "c", "d"], 5
    start, out = ctx.Barrier(len(kinds)), ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(tmp_path, k, start, count, out)) for k in kinds]
    for p in procs:
        p.start()
    got = [v for _ in procs for v in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    s = make_store(tmp_path)
    numbers = sorted(s.number(v) for v in got)
    assert numbers == list(range(1, len(kinds) * count + 1))
    logged = [json.loads(x)["version"] for x in s.allocations_path.read_text().splitlines()]
    assert sorted(logged) == sorted(got) and sorted(s.folders()) == sorted(got)


# ------------------------------------------------------------- reading
def test_incomplete_versions_are_not_listed(tmp_path):
    s = make_store(tmp_path)
    assert s.versions() == [] and s.manifests() == []
    done, half = new(s), new(s)
    complete(s, done, status="ok")
    (s.versions_root / "t0003-a.tmp").mkdir()  # not an id: ignored
    assert s.folders() == [done, half] and s.versions() == [done]
    assert s.manifests() == [{"version": done, "status": "ok"}]
    with pytest.raises(UserError, match=r"test version t0002-a is incomplete \(no .*manifest.json\)"):
        s.read_manifest(half)
    with pytest.raises(UserError, match=r"no test version t0007-a under .*versions"):
        s.read_manifest("t0007-a")
    (s.path(half) / "manifest.json").write_text("{half")
    with pytest.raises(UserError, match=r"manifest.json: not valid JSON"):
        s.read_manifest(half)


# ------------------------------------------------------------- pointer
def test_pointer_set_clear_and_log(tmp_path, clock):
    s = make_store(tmp_path)
    assert s.pointer() is None and s.log() == [] and s.clear_pointer({}) is None
    v1, v2 = new(s), new(s)
    clock("2026-01-01T10:00:00+00:00")
    first = s.set_pointer(v1, {})
    assert first == {"version": v1, "switched_at": "2026-01-01T10:00:00+00:00", "previous": None}
    assert s.pointer() == first
    clock("2026-01-02T10:00:00+00:00")
    second = s.set_pointer(v2, {"repair": {"id": "r1"}})
    assert second == {"version": v2, "repair": {"id": "r1"}, "switched_at": "2026-01-02T10:00:00+00:00", "previous": v1}
    assert s.pointer() == second
    # The pointer file is the entry, keys in order; the log has one JSON line per change.
    assert list(json.loads(s.pointer_path.read_text())) == ["version", "repair", "switched_at", "previous"]
    assert s.log_path.read_text().splitlines()[1] == json.dumps(second)
    clock("2026-01-03T10:00:00+00:00")
    gone = s.clear_pointer({"reason": "repair"})
    assert gone == {"version": None, "reason": "repair", "switched_at": "2026-01-03T10:00:00+00:00", "previous": v2}
    assert s.pointer() is None and not s.pointer_path.exists()
    assert s.log() == [first, second, gone]
    s.pointer_path.write_text("{not json")
    with pytest.raises(UserError, match=r"CURRENT: corrupt test pointer .*; set it again"):
        s.pointer()
    s.log_path.write_text(s.log_path.read_text() + "{torn\n")
    with pytest.raises(UserError, match=r"switch_log.jsonl, line 4: not valid JSON"):
        s.log()


def test_pointer_as_of_a_time_is_replayed_from_the_log(tmp_path, clock):
    s = make_store(tmp_path)
    v1, v2, v3 = new(s), new(s), new(s)
    changes = {}
    for at, version in (
        ("2026-01-01T10:00:00+00:00", v1),
        ("2026-01-02T10:00:00+00:00", v2),
        ("2026-01-03T10:00:00+00:00", None),
        ("2026-01-04T10:00:00+00:00", v3),
        ("2026-01-04T10:00:00+00:00", v1),  # two changes within one second: the last holds
    ):
        clock(at)
        changes[at] = s.set_pointer(version, {}) if version else s.clear_pointer({})

    def at(text):
        e = s.pointer_at(dt.datetime.fromisoformat(text))
        return e and e["version"]

    assert at("2026-01-01T09:59:59+00:00") is None  # before the first
    assert at("2026-01-01T10:00:00+00:00") == v1  # the moment it was set
    assert at("2026-01-02T09:00:00+00:00") == v1
    assert at("2026-01-02T10:00:00") == v2  # naive: UTC
    assert at("2026-01-02T12:30:00+02:00") == v2  # another zone, the same instant rules
    assert at("2026-01-03T12:00:00+00:00") is None  # the pointer was removed then
    assert at("2026-01-05T00:00:00+00:00") == v1
    assert s.pointer_at(dt.datetime(2026, 1, 2, 12, tzinfo=dt.UTC)) == changes["2026-01-02T10:00:00+00:00"]
