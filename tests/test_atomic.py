"""Folders appear complete or not at all."""

import pytest

from apl_adapter.atomic import atomic_folder, replace_folder


def test_failure_inside_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_success_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_replace_refuses_a_folder_that_appeared(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_folder(target) as staging:
        (staging / "a").write_text("a")
        target.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_restores_the_old_one_when_the_swap_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError):
        replace_folder(tmp_path / "missing-staging", target)
    assert (target / "old.txt").read_text() == "old"


def test_finished_folder_has_the_mode_of_a_normal_mkdir(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "x.txt").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
