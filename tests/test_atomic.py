"""atomic.py: a writer killed (SIGKILL) at each stage leaves the old or the new whole, and the next write cleans up."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import atomic

ROOT = Path(__file__).resolve().parents[1]

# A child process writes `dest` anew and kills itself at one stage: the patches below are the test's, not atomic.py's.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import atomic

    dest, folder, stage = Path(sys.argv[2]), sys.argv[3] == "folder", sys.argv[4]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_replace, real_fsync, renames = os.replace, atomic.fsync_tree, []

    def fsync_tree(path):
        real_fsync(path)
        if stage == "flushed":
            die()

    def replace(src, dst):
        real_replace(src, dst)
        renames.append(dst)
        if stage == "aside" and len(renames) == 1 and Path(src) == dest:
            die()  # the old folder moved aside, the new one not yet in place
        if stage == "installed" and Path(dst) == dest:
            die()  # the new one in place, the old one (folders) not yet removed

    atomic.fsync_tree, atomic.os.replace = fsync_tree, replace
    with atomic.atomic_path(dest, folder=folder) as tmp:
        target = tmp / "data.txt" if folder else tmp
        target.write_text("new " * 1000)
        if folder:
            (tmp / "second.txt").write_text("new")
        if stage == "writing":
            die()
""")


def old_or_new(dest: Path, folder: bool) -> str:
    text = (dest / "data.txt" if folder else dest).read_text()
    if folder:
        assert sorted(p.name for p in dest.iterdir()) == (["data.txt", "second.txt"] if text.startswith("new") else ["data.txt"])
    assert text in ("old " * 1000, "new " * 1000)
    return text.split()[0]


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


STAGES = [(False, "writing"), (False, "flushed"), (False, "installed"),  # a file is replaced in one rename
          (True, "writing"), (True, "flushed"), (True, "aside"), (True, "installed")]


@pytest.mark.parametrize("folder, stage", STAGES, ids=[f"{'folder' if f else 'file'}-{s}" for f, s in STAGES])
def test_kill_9_at_each_stage_leaves_the_old_or_the_new_whole(tmp_path, folder, stage):
    dest = tmp_path / "out" / "result"
    if folder:
        dest.mkdir(parents=True)
        (dest / "data.txt").write_text("old " * 1000)
    else:
        dest.parent.mkdir()
        dest.write_text("old " * 1000)
    kind = "folder" if folder else "file"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(dest), kind, stage], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if folder or stage != "installed":  # a file renamed into place leaves nothing behind
        assert leftovers(dest), "the killed writer left nothing behind: the test did not reach its stage"

    if dest.exists():  # killed between a folder's two renames: absent until the next write puts the old one back
        expected = "new" if stage == "installed" else "old"
        assert old_or_new(dest, folder) == expected
    else:
        assert stage == "aside"

    atomic.clean_leftovers(dest)  # what the next write to dest does first
    assert leftovers(dest) == []
    assert old_or_new(dest, folder) == ("new" if stage == "installed" else "old")

    atomic.write_atomic(dest / "data.txt" if folder else dest, "new " * 1000)
    assert leftovers(dest) == []


def test_a_running_writers_temporary_is_left_alone(tmp_path):
    dest = tmp_path / "model.gguf"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".model.gguf.tmp-{sleeper.pid}-1"
        theirs.write_text("half")
        dead = tmp_path / ".model.gguf.tmp-999999999-1"  # no such process
        dead.write_text("half")
        atomic.write_atomic(dest, b"whole")
        assert theirs.exists() and not dead.exists() and dest.read_bytes() == b"whole"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_error_inside_leaves_the_destination_and_no_temporary(tmp_path):
    dest = tmp_path / "tok"
    dest.mkdir()
    (dest / "vocab.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(dest, folder=True) as tmp:
            (tmp / "vocab.json").write_text('{"a": 1}')
            raise RuntimeError("training failed")
    assert os.listdir(tmp_path) == ["tok"] and (dest / "vocab.json").read_text() == "{}"


def test_replace_false_keeps_what_another_process_finished_first(tmp_path):
    dest = tmp_path / "entry"
    with atomic.atomic_path(dest, folder=True, replace=False) as tmp:
        (tmp / "a").write_text("ours")
        dest.mkdir()
        (dest / "a").write_text("theirs")
    assert (dest / "a").read_text() == "theirs" and os.listdir(tmp_path) == ["entry"]
