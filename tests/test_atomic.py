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


def _save_repeatedly(folder: str, seed: int, count: int) -> None:
    from peft import get_peft_model

    from apl_adapter import APLConfig, save_adapter
    from apl_adapter.testing import tiny_clip_text_model

    model = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4, init_seed=seed))
    for _ in range(count):
        save_adapter(model, folder)


def _read_repeatedly(folder: str, stop, failures) -> None:
    from apl_adapter import check_adapter_folder

    while not stop.is_set():
        try:
            check_adapter_folder(folder)
        except Exception as err:  # a reader must always find a complete adapter
            failures.put(f"{type(err).__name__}: {err}")


def test_concurrent_saves_and_reads_of_one_adapter_are_safe(tmp_path):
    """Two processes save the same adapter folder 25 times each while a third reads it: no save fails, no read
    finds it missing or half-written, and no staging or backup folder is left."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    folder = str(tmp_path / "adapter")
    _save_repeatedly(folder, 0, 1)
    stop, failures = context.Event(), context.Queue()
    reader = context.Process(target=_read_repeatedly, args=(folder, stop, failures))
    writers = [context.Process(target=_save_repeatedly, args=(folder, seed, 25)) for seed in (1, 2)]
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    stop.set()
    reader.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0]
    seen = []
    while not failures.empty():
        seen.append(failures.get())
    assert seen == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_killed_writers_staging_folder_is_removed_by_the_next_writer(tmp_path, caplog):
    import subprocess
    import sys

    # a real process that dies by SIGKILL while its staging folder exists
    script = (
        "import os, signal, sys\n"
        "from apl_adapter.atomic import atomic_folder\n"
        "with atomic_folder(sys.argv[1]) as staging:\n"
        "    (staging / 'big.bin').write_bytes(bytes(1 << 20))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoint-10")], check=False)
    assert done.returncode == -9
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".checkpoint-10.writing-")
    with atomic_folder(tmp_path / "checkpoint-20") as staging:  # the next run's next checkpoint
        (staging / "ok.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20"]
    assert any(str(stale) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)
