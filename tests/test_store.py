"""The resumable result store of ``explain-dataset`` on its own: files only, no model and no torch.

Shards, merging (partial lines, duplicated indices, a crash in the middle of a merge), damaged files,
atomic writes, ``run.json`` checks, ``--force``, the directory lock and the partition of the inputs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from implicit_attention.dataset import DatasetError, store
from implicit_attention.dataset.store import (
    LOCK_FILE,
    RESULTS_FILE,
    RESUME_KEYS,
    RUN_FILE,
    RUN_VERSION,
    SETTING_OPTIONS,
    SUMMARY_FILE,
    append_results,
    check_run,
    done_indices,
    merge_results,
    read_results,
    run_lock,
    shard_indices,
    shard_path,
    start_run,
    write_atomic,
)

SETTINGS = {"input": "/data/reviews.csv", "input_sha256": "ab" * 32, "format": "csv", "text_key": "text",
            "label_key": "label", "label_map": {}, "model": "rt-sentiment-mamba", "method": "attribution",
            "variant": "unified", "layers": None, "aggregate": "abs", "dtype": "float32", "target": None,
            "check": True}


def row(i: int, tag: str = "") -> str:
    """One result line; ``tag`` tells copies of the same index apart."""
    return json.dumps({"index": i, "relevance": [float(i)], "tag": tag}) + "\n"


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def write_run(out: Path, settings: dict, version=RUN_VERSION) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({"version": version, "settings": settings}))


# ------------------------------------------------------------------------------ shards, merge
def test_merge_and_shard_helpers(tmp_path: Path) -> None:
    assert shard_indices([0, 1, 3, 4, 6], 0, 2) == [0, 4, 6] and shard_indices([0, 1, 3, 4, 6], 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        shard_indices([1], 2, 2)
    row = lambda i: json.dumps({"index": i, "relevance": [float(i)]}) + "\n"  # noqa: E731
    (tmp_path / "results.jsonl").write_text(row(0) + row(5) + '{"ind')
    shard_path(tmp_path, 0).write_text(row(2) + row(5))
    shard_path(tmp_path, 3).write_text(row(1) + row(4) + '{"index": 6, "rel')
    merged = merge_results(tmp_path)
    assert [r["index"] for r in merged] == [0, 1, 2, 4, 5]
    assert (tmp_path / "results.jsonl").read_text() == "".join(row(i) for i in (0, 1, 2, 4, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
    assert merge_results(tmp_path) == merged  # idempotent
    (tmp_path / "results.jsonl").write_text(row(0) + "garbage\n" + row(1))
    with pytest.raises(DatasetError, match="damaged"):
        read_results(tmp_path / "results.jsonl")


def test_shard_path_names() -> None:
    assert shard_path("runs/x", 0) == Path("runs/x/results.rank0.jsonl")
    assert shard_path(Path("/o"), 12).name == "results.rank12.jsonl"


def test_merge_keeps_first_copy_sorted_and_removes_shards(tmp_path: Path) -> None:
    """results.jsonl first, then the shards by rank as a number (rank 2 before rank 10)."""
    (tmp_path / RESULTS_FILE).write_text(row(7, "results") + row(3, "results"))
    shard_path(tmp_path, 10).write_text(row(4, "rank10") + row(3, "rank10") + row(9, "rank10") + '{"index": 11, "re')
    shard_path(tmp_path, 2).write_text(row(4, "rank2") + row(0, "rank2") + row(7, "rank2"))
    not_a_shard = tmp_path / "results.rankx.jsonl"  # not a rank number: not one of ours, left alone
    not_a_shard.write_text(row(5, "other"))
    merged = merge_results(tmp_path)
    assert [(r["index"], r["tag"]) for r in merged] == [
        (0, "rank2"), (3, "results"), (4, "rank2"), (7, "results"), (9, "rank10")]
    expected = row(0, "rank2") + row(3, "results") + row(4, "rank2") + row(7, "results") + row(9, "rank10")
    assert (tmp_path / RESULTS_FILE).read_text() == expected
    assert names(tmp_path) == [RESULTS_FILE, "results.rankx.jsonl"]
    assert not_a_shard.read_text() == row(5, "other")
    assert done_indices(tmp_path) == {0, 3, 4, 7, 9}


def test_merge_without_shards_sorts_but_does_not_rewrite(tmp_path: Path) -> None:
    results = tmp_path / RESULTS_FILE
    assert merge_results(tmp_path) == [] and not results.exists()  # nothing there: nothing written
    results.write_text(row(5) + row(1))
    os.utime(results, ns=(10**9, 10**9))
    assert [r["index"] for r in merge_results(tmp_path)] == [1, 5]
    assert results.read_text() == row(5) + row(1) and results.stat().st_mtime_ns == 10**9  # untouched
    results.write_text(row(5) + row(1) + '{"index": 2')  # a partial line: rewritten without it
    assert [r["index"] for r in merge_results(tmp_path)] == [1, 5]
    assert results.read_text() == row(1) + row(5)


def layout(out: Path) -> None:
    out.mkdir()
    (out / RESULTS_FILE).write_text(row(0, "results") + row(6, "results") + '{"ind')
    shard_path(out, 0).write_text(row(2, "rank0") + row(6, "rank0"))
    shard_path(out, 1).write_text(row(1, "rank1") + row(2, "rank1"))
    shard_path(out, 2).write_text(row(5, "rank2") + row(3, "rank2") + '{"index": 8, "rel')


@pytest.mark.parametrize("crash_at", ["replace", "first_unlink", "second_unlink"])
def test_merge_again_after_a_crash_mid_merge(tmp_path: Path, monkeypatch, crash_at: str) -> None:
    """A merge killed before the rename, or after it with some shards still there, merges to the same file."""
    layout(tmp_path / "clean")
    expected = merge_results(tmp_path / "clean")
    expected_text = (tmp_path / "clean" / RESULTS_FILE).read_text()
    assert [(r["index"], r["tag"]) for r in expected] == [
        (0, "results"), (1, "rank1"), (2, "rank0"), (3, "rank2"), (5, "rank2"), (6, "results")]

    out = tmp_path / "crashed"
    layout(out)
    before = (out / RESULTS_FILE).read_text()
    unlinks = []
    real_unlink, real_replace = Path.unlink, os.replace

    def unlink(self, *args, **kwargs):
        unlinks.append(self.name)
        if (crash_at, len(unlinks)) in (("first_unlink", 1), ("second_unlink", 2)):
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    def replace(src, dst):
        if crash_at == "replace":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(store.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        merge_results(out)
    monkeypatch.undo()
    shards_left = sorted(p.name for p in out.glob("results.rank*.jsonl"))
    if crash_at == "replace":
        assert (out / RESULTS_FILE).read_text() == before  # the old file is whole
        assert shards_left == ["results.rank0.jsonl", "results.rank1.jsonl", "results.rank2.jsonl"]
    else:
        assert (out / RESULTS_FILE).read_text() == expected_text  # renamed in, then killed
        assert shards_left == ["results.rank0.jsonl", "results.rank1.jsonl", "results.rank2.jsonl"][len(unlinks) - 1:]
    assert merge_results(out) == expected
    assert (out / RESULTS_FILE).read_text() == expected_text
    assert names(out) == [RESULTS_FILE]  # shards gone, the temporary file of a killed rename replaced
    assert merge_results(out) == expected and (out / RESULTS_FILE).read_text() == expected_text


# ------------------------------------------------------------------------------- reading, writing
def test_read_results_partial_last_line_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    assert read_results(path) == []  # missing file
    path.write_text(row(3, "a") + "\n" + row(1, "b") + '{"index": 9, "relevance": [0.')
    assert read_results(path) == [{"index": 3, "relevance": [3.0], "tag": "a"},
                                  {"index": 1, "relevance": [1.0], "tag": "b"}]  # file order, blank line skipped
    path.write_text(row(3) + row(1))
    assert [r["index"] for r in read_results(path)] == [3, 1]
    for damaged in ('{"index": 4, "rel\n', "[1, 2]\n", '{"index": "4"}\n', '{"text": "no index"}\n'):
        path.write_text(row(0) + damaged + row(1))
        with pytest.raises(DatasetError, match=r"r\.jsonl, line 2: not a result object; the file is damaged"):
            read_results(path)
    path.write_text(row(0) + row(1) + "garbage\n")  # a complete last line is damage too, not a cut write
    with pytest.raises(DatasetError, match="line 3"):
        read_results(path)


def test_append_results_one_line_per_row(tmp_path: Path) -> None:
    path = shard_path(tmp_path, 0)
    with open(path, "a", encoding="utf-8", newline="\n") as handle:
        append_results(handle, [])
        assert path.read_text() == ""
        append_results(handle, [{"index": 2, "text": "é"}, {"index": 0, "text": "x"}])
        append_results(handle, [{"index": 1, "text": "y"}])
        assert path.read_text(encoding="utf-8") == ('{"index": 2, "text": "é"}\n{"index": 0, "text": "x"}\n'
                                                    '{"index": 1, "text": "y"}\n')  # flushed, not escaped
        with pytest.raises(ValueError):
            append_results(handle, [{"index": 3, "relevance": [float("nan")]}])
    assert [r["index"] for r in read_results(path)] == [2, 0, 1]


def test_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / SUMMARY_FILE
    write_atomic(target, "first\n")
    assert target.read_text() == "first\n" and names(tmp_path) == [SUMMARY_FILE]
    write_atomic(target, '{"a": "é"}\n')  # replaces
    assert target.read_bytes() == '{"a": "é"}\n'.encode() and names(tmp_path) == [SUMMARY_FILE]


# ------------------------------------------------------------------------------------- run.json
def test_check_run_accepts_a_new_or_matching_run(tmp_path: Path) -> None:
    check_run(tmp_path / "missing", SETTINGS, False)  # nothing there yet
    assert not (tmp_path / "missing").exists()  # read-only
    check_run(tmp_path, SETTINGS, False)  # an empty directory
    write_run(tmp_path, SETTINGS)
    (tmp_path / RESULTS_FILE).write_text(row(0))
    check_run(tmp_path, dict(SETTINGS), False)
    # outside RESUME_KEYS (the input's path, batch size, device, ...) may change between runs
    assert "input" not in RESUME_KEYS
    check_run(tmp_path, dict(SETTINGS, input="/elsewhere/reviews.csv", batch_size=64), False)


def test_check_run_refuses_other_settings(tmp_path: Path) -> None:
    write_run(tmp_path, SETTINGS)
    with pytest.raises(DatasetError) as info:
        check_run(tmp_path, dict(SETTINGS, method="rollout", layers=[-1]), False)
    message = str(info.value)
    assert "holds a run with other settings" in message and "--force" in message
    assert "--method: 'attribution' there, 'rollout' now; --layers: all there, -1 now" in message
    assert "contents changed" not in message
    with pytest.raises(DatasetError, match=r"other settings \(the input file's contents changed\) \(the input file's "
                                           r"contents: sha256 "):
        check_run(tmp_path, dict(SETTINGS, input_sha256="cd" * 32), False)
    for key in RESUME_KEYS:
        with pytest.raises(DatasetError, match=re.escape(SETTING_OPTIONS[key]) + ": "):
            check_run(tmp_path, dict(SETTINGS, **{key: "changed"}), False)
        check_run(tmp_path, dict(SETTINGS, **{key: "changed"}), True)  # force: accepted
    assert json.loads((tmp_path / RUN_FILE).read_text())["settings"] == SETTINGS  # check_run writes nothing


@pytest.mark.parametrize("content, message", [
    (json.dumps({"version": RUN_VERSION + 1, "settings": SETTINGS}),
     rf"another version of explain-dataset \({RUN_VERSION + 1}\)"),
    (json.dumps({"settings": SETTINGS}), r"another version of explain-dataset \(None\)"),
    (json.dumps({"version": RUN_VERSION}), "cannot read"),
    ("{not json", "cannot read"),
    ("[]", "cannot read"),
])
def test_check_run_refuses_other_versions_and_unreadable_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / RUN_FILE).write_text(content)
    with pytest.raises(DatasetError, match=message):
        check_run(tmp_path, SETTINGS, False)
    check_run(tmp_path, SETTINGS, True)


def test_check_run_refuses_results_without_run_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not ours")
    check_run(tmp_path, SETTINGS, False)  # other files only: fine
    for make in (lambda: (tmp_path / RESULTS_FILE).write_text(""), lambda: shard_path(tmp_path, 3).write_text(row(3))):
        make()
        with pytest.raises(DatasetError, match=f"holds results but no {RUN_FILE}"):
            check_run(tmp_path, SETTINGS, False)
        check_run(tmp_path, SETTINGS, True)
        for path in (tmp_path / RESULTS_FILE, shard_path(tmp_path, 3)):
            path.unlink(missing_ok=True)
    (tmp_path / "file").write_text("")
    for force in (False, True):
        with pytest.raises(DatasetError, match="exists and is not a directory"):
            check_run(tmp_path / "file", SETTINGS, force)


def test_start_run_writes_run_file_once_and_merges(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    assert start_run(out, SETTINGS, False) == []  # creates the directory
    stored = json.loads((out / RUN_FILE).read_text())
    assert stored["version"] == RUN_VERSION and stored["settings"] == SETTINGS and stored["created"]
    assert names(out) == [RUN_FILE]
    first = (out / RUN_FILE).read_text()
    shard_path(out, 1).write_text(row(4) + row(2))
    rows = start_run(out, dict(SETTINGS, input="/moved.csv"), False)  # a resumed run: run.json stays as it is
    assert [r["index"] for r in rows] == [2, 4] and (out / RUN_FILE).read_text() == first
    assert names(out) == [RESULTS_FILE, RUN_FILE]
    check_run(out, SETTINGS, False)


def test_start_run_force_deletes_only_this_tools_files(tmp_path: Path) -> None:
    write_run(tmp_path, dict(SETTINGS, method="rollout"))
    ours = [RESULTS_FILE, SUMMARY_FILE, "results.rank0.jsonl", "results.rank13.jsonl", ".results.jsonl.tmp4242",
            ".summary.json.tmp7"]
    others = ["notes.txt", "results.csv", "results.rankx.jsonl", "results.rank1.json", "summary.json.bak",
              "my.tmp", LOCK_FILE]
    for name in ours + others:
        (tmp_path / name).write_text(row(1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / RESULTS_FILE).write_text(row(2))
    assert start_run(tmp_path, SETTINGS, True) == []
    assert names(tmp_path) == sorted(others + [RUN_FILE, "sub"])
    assert all((tmp_path / name).read_text() == row(1) for name in others)
    assert (tmp_path / "sub" / RESULTS_FILE).read_text() == row(2)
    assert json.loads((tmp_path / RUN_FILE).read_text())["settings"] == SETTINGS  # the new settings
    check_run(tmp_path, SETTINGS, False)


# ------------------------------------------------------------------------------------ the lock
HOLD = textwrap.dedent("""
    import fcntl, sys
    handle = open(sys.argv[1], "a")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.read()
""")
TRY = textwrap.dedent("""
    import fcntl, sys
    handle = open(sys.argv[1], "a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
""")


def test_run_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    out = tmp_path / "o"
    lock = out / LOCK_FILE
    with run_lock(out):
        assert lock.is_file() and lock.read_text() == ""
        # another process cannot take it, nor a second run_lock (another open file) in this one
        assert subprocess.run([sys.executable, "-c", TRY, str(lock)], timeout=60).returncode == 3
        with pytest.raises(DatasetError, match="another explain-dataset run is writing to .*it holds "
                                                r"\.explain-dataset\.lock"):
            with run_lock(out):
                pass  # pragma: no cover
        with open(lock, "a") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    # released and removed at the end (no lock file left behind); another process then takes a new one
    assert names(out) == []
    assert subprocess.run([sys.executable, "-c", TRY, str(lock)], timeout=60).returncode == 0


def test_run_lock_refused_while_another_process_holds_it(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DatasetError, match="another explain-dataset run"):
            with run_lock(tmp_path):
                pass  # pragma: no cover
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    entered = []
    with run_lock(tmp_path):  # the holder is gone (a killed run releases it the same way)
        entered.append(True)
    assert entered == [True]


# ---------------------------------------------------------------------------------- partition
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shard_indices_partition(world_size: int) -> None:
    pending = [0, 1, 3, 4, 6, 9, 10, 11, 15, 22]
    shares = [shard_indices(pending, rank, world_size) for rank in range(world_size)]
    assert sorted(i for share in shares for i in share) == pending  # every index once
    assert sum(map(len, shares)) == len(pending)
    for rank, share in enumerate(shares):
        assert share == [i for i in pending if i % world_size == rank]  # in pending order
    assert shard_indices(pending, 0, 1) == pending
    for rank in (-1, world_size):
        with pytest.raises(ValueError, match=f"rank {rank} out of range for world size {world_size}"):
            shard_indices(pending, rank, world_size)


def test_shard_indices_fixed_values() -> None:
    pending = [0, 1, 3, 4, 6, 9, 10]
    assert [shard_indices(pending, r, 3) for r in range(3)] == [[0, 3, 6, 9], [1, 4, 10], []]
    assert shard_indices([], 0, 2) == []


# -------------------------------------------------------------------------------------- no torch
def test_store_formats_and_labels_import_without_torch() -> None:
    """With torch and transformers unimportable, the data set package and its store still work."""
    src = Path(store.__file__).resolve().parents[2]
    code = textwrap.dedent(f"""
        import importlib.abc, sys, tempfile, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "numpy"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        package = types.ModuleType("implicit_attention")  # skip the package's __init__ (it needs torch)
        package.__path__ = [{str(src / "implicit_attention")!r}]
        sys.modules["implicit_attention"] = package
        from implicit_attention.dataset import formats, labels, store
        with tempfile.TemporaryDirectory() as out:
            store.shard_path(out, 0).write_text('{{"index": 1}}\\n{{"index": 0}}\\n')
            print([row["index"] for row in store.merge_results(out)])
        print(labels.parse_label_map("a=b"), formats.detect_format("x.tsv"))
        print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers")))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[0, 1]", "{'a': 'b'} tsv", "[]"]
