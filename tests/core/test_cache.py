"""The per-machine cache (core.cache): inventory, least-recently-used pruning, touch on use."""
import itertools
import os
import time

import numpy as np
import pytest

import evolve.run  # noqa: F401  (its owners register the cache's sections: evolve, fitness, core)
from core.cache import SECTIONS, entries, remove, select

NOW = 1_900_000_000.0


def make_cache(root, ages: dict[str, float], now: float = NOW) -> dict[str, int]:
    """Entries named section/name with the given ages (seconds before `now`); returns their sizes."""
    sizes = {}
    for i, (key, age) in enumerate(sorted(ages.items())):
        section, name = key.split("/")
        if section == "endpoints":  # a folder entry: its files' sizes add up
            folder = root / section / name
            (folder / "sub").mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"x" * (100 + i))
            (folder / "sub" / "config.json").write_bytes(b"y" * 10)
            os.utime(folder, (now - age, now - age))
            sizes[key] = 110 + i
        else:
            path = root / section / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"z" * (10 + i))
            os.utime(path, (now - age, now - age))
            sizes[key] = 10 + i
    return sizes


AGES = {"endpoints/e1": 90 * 86400, "endpoints/e2": 600, "responses/r1": 40 * 86400, "responses/r2": 2 * 86400,
        "irt/i1": 10 * 86400, "hashes/h1": 100, "hashes/h2": 200 * 86400}


def test_owners_register_every_section():
    assert SECTIONS == {"endpoints": True, "responses": False, "irt": False, "hashes": False}


def test_entries_list_every_section_with_sizes_and_last_use(tmp_path):
    sizes = make_cache(tmp_path, AGES)
    found = entries(tmp_path)
    assert {f"{e.section}/{e.path.name}": e.bytes for e in found} == sizes
    assert [e.last_used for e in found] == sorted(NOW - a for a in AGES.values())


@pytest.mark.parametrize("older_than,max_bytes,keep_recent", [
    (30 * 86400, None, 3600), (None, 150, 3600), (None, 0, 3600), (5 * 86400, 200, 0), (None, 10**6, 3600),
    (None, 150, 30 * 86400)])
def test_selection_matches_brute_force_least_recently_used(tmp_path, older_than, max_bytes, keep_recent):
    """Against enumeration of every subset of the removable entries: the chosen set is the
    smallest one that holds everything idle past `older_than`, removes the least recently used
    before any more recently used one, and leaves the rest within `max_bytes` (or, when none
    does, all of them); nothing used within `keep_recent` is removed."""
    make_cache(tmp_path, AGES)
    found = entries(tmp_path)
    got = {e.path for e in select(found, older_than=older_than, max_bytes=max_bytes, keep_recent=keep_recent, now=NOW)}
    removable = [e for e in found if NOW - e.last_used >= keep_recent]
    must = {e.path for e in removable if older_than is not None and NOW - e.last_used > older_than}
    total = sum(e.bytes for e in found)

    def ok(subset):
        paths = {e.path for e in subset}
        extra = [e for e in subset if e.path not in must]
        kept = [e for e in removable if e.path not in paths]
        lru = all(x.last_used <= k.last_used for x in extra for k in kept)
        fits = max_bytes is None or total - sum(e.bytes for e in subset) <= max_bytes
        return must <= paths and lru and (fits or len(subset) == len(removable))

    subsets = [c for n in range(len(removable) + 1) for c in itertools.combinations(removable, n) if ok(c)]
    want = {e.path for e in min(subsets, key=len)}
    assert got == want
    assert all(NOW - e.last_used >= keep_recent for e in found if e.path in got)


def test_remove_frees_the_entries_and_tolerates_ones_already_gone(tmp_path):
    sizes = make_cache(tmp_path, AGES)
    chosen = select(entries(tmp_path), older_than=30 * 86400, now=NOW)
    chosen[0].path.rename(tmp_path / "moved")  # another prune got there first
    assert remove(chosen) == sum(e.bytes for e in chosen[1:])
    left = {f"{e.section}/{e.path.name}" for e in entries(tmp_path)}
    assert left == set(sizes) - {f"{e.section}/{e.path.name}" for e in chosen}


def test_a_cache_hit_marks_the_entry_used_and_a_pruned_entry_is_recomputed(tmp_path):
    from data.benchmarks import from_items
    from fitness.evaluate import EvalSettings, Responses, cached_responses, cached_responses_path

    bench = from_items("b", [{"id": "q1", "prompt": "p", "answer": "a"}, {"id": "q2", "prompt": "p", "answer": "b"}])
    answers = Responses(bench.ids, np.array([1, 0], dtype=np.uint8), np.array([2, 3]), ["a", "c"])
    calls = []

    def compute():
        calls.append(1)
        return answers

    cached_responses("m" * 64, bench, EvalSettings(), "cpu", compute, cache_dir=tmp_path)
    path = cached_responses_path("m" * 64, bench, EvalSettings(), "cpu", tmp_path)
    os.utime(path, (NOW - 1e6, NOW - 1e6))
    got = cached_responses("m" * 64, bench, EvalSettings(), "cpu", compute, cache_dir=tmp_path)
    assert len(calls) == 1 and time.time() - path.stat().st_mtime < 60  # read, and touched
    path.unlink()
    again = cached_responses("m" * 64, bench, EvalSettings(), "cpu", compute, cache_dir=tmp_path)
    assert len(calls) == 2 and np.array_equal(again.correct, got.correct)


def test_cli_prunes_to_a_size_and_reports(tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    make_cache(tmp_path, AGES, now=time.time())
    assert main(["cache", "prune", "--max-size", "150", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and len(entries(tmp_path)) == len(AGES)
    assert main(["cache", "prune", "--max-size", "150"]) == 0
    out = capsys.readouterr().out
    left = entries(tmp_path)
    assert "removed" in out and sum(e.bytes for e in left) <= 150
    assert {f"{e.section}/{e.path.name}" for e in left} >= {"endpoints/e2", "hashes/h1"}  # used within the hour
    assert main(["cache", "prune"]) == 2
    assert "give --older-than and/or --max-size" in capsys.readouterr().err
