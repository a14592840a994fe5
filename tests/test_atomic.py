"""``logitsam._atomic``: a write that fails (or a process that dies) leaves the old file or folder whole."""

import os

import pytest

from logitsam._atomic import atomic_dir, atomic_path, commit_files, remove_staged, start_staging, write_json, write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "run_info.json"
    write_json(target, {"a": 1})
    write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["run_info.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as a plain open() would make it


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that read the extension still work
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_atomic_dir_swaps_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "checkpoint-2"
    with atomic_dir(target) as staged:
        assert staged.name == "checkpoint-2" and not any(staged.iterdir())
        (staged / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staged:
        (staged / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as staged:
        (staged / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_remove_staged_clears_what_a_killed_writer_left(tmp_path):
    start_staging(tmp_path / "checkpoint-4")
    (tmp_path / ".metrics.jsonl.1234abcd.tmp.jsonl").write_text("half")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".hidden").write_text("not ours")
    removed = remove_staged(tmp_path, "checkpoint-*")
    assert [p.name for p in removed] == [".checkpoint-4.tmp"]
    remove_staged(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "checkpoint-2"]


def test_commit_files_moves_each_file_into_place(tmp_path):
    (tmp_path / "model.safetensors").write_text("old")
    (tmp_path / "metrics.jsonl").write_text("kept")
    staged = start_staging(tmp_path / "final-model")
    (staged / "model.safetensors").write_text("new")
    commit_files(staged, tmp_path)
    assert (tmp_path / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "model.safetensors"]
