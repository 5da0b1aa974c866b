"""One writer per run, disk failures as one line with nothing lost, verified metadata, no duplicated metrics."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError

from lmforge import checkpoint as ckpt_io
from lmforge.checkpoint import latest_checkpoint, list_checkpoints, read_metrics, verify_checkpoint
from lmforge.cli import EXIT_USAGE, main
from lmforge.runlock import LOCK_FILE, RunLock

from .test_robust import spawn, train_args

BASE = ["--checkpoint.every=2", "--eval.every=0"]


def train_steps(run) -> list[int]:
    return [r["step"] for r in read_metrics(run) if r["type"] == "train"]


def wait_for(condition, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


def lock_record(run) -> dict:
    try:
        return json.loads((run / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def four_steps(tiny_data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and a metrics line per step."""
    run = tmp_path_factory.mktemp("four") / "run"
    assert main(train_args(tiny_data, run, "--train.max_steps=4", *BASE)) == 0
    return run


# --- 1. one writer per run ---------------------------------------------------------------------------


def test_a_second_train_on_the_same_run_is_refused_and_the_first_finishes_clean(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    first = spawn(tiny_data, run, "--train.max_steps=300", "--checkpoint.every=100", "--eval.every=0")
    wait_for(lambda: lock_record(run).get("pid") == first.pid, first)
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=300", *BASE)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert first.poll() is None, "the first run ended before the second tried: the check proved nothing"
    assert len(err.splitlines()) == 1 and "in use by another `lmforge train`" in err
    assert f"pid {first.pid} on " in err and "since 20" in err

    out, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs
    assert train_steps(run) == list(range(1, 301))  # each step once: the second run wrote nothing
    assert latest_checkpoint(run).name == "step_0000300"
    for ckpt in list_checkpoints(run):
        verify_checkpoint(ckpt)
    assert not (run / LOCK_FILE).exists()  # a run that ends normally removes its lock file


def test_a_held_lock_refuses_before_anything_is_read_or_written(tiny_data, tmp_path, four_steps, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with RunLock(run):  # flock locks belong to the open file, so this process is "another run" too
        capsys.readouterr()
        assert main(train_args(tiny_data, run, "--train.max_steps=6", *BASE)) == EXIT_USAGE
        assert f"pid {os.getpid()} on " in capsys.readouterr().err
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
        assert after == before
        # read-only commands never take the lock
        assert main(["status", str(run)]) == 0
        assert main(["generate", "--run", str(run), "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert main(train_args(tiny_data, run, "--train.max_steps=6", *BASE)) == 0  # released: it runs


def test_a_run_killed_before_its_first_checkpoint_restarts_clean(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    killed = spawn(tiny_data, run, "--train.max_steps=500", "--checkpoint.every=0", "--eval.every=0")
    wait_for(lambda: len(train_steps(run)) >= 5, killed)
    killed.send_signal(signal.SIGKILL)  # no handler runs: the lock file and its record stay behind
    killed.communicate(timeout=60)
    assert not ckpt_io.step_checkpoints(run)  # (a `best` from the eval at step 0 may be there)
    n_lines = len((run / "metrics.jsonl").read_text().splitlines())
    holder = lock_record(run)  # what the killed run left in its lock file

    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=4", *BASE)) == 0
    out = capsys.readouterr().out
    assert train_steps(run) == [1, 2, 3, 4]  # no step from the killed start appears twice
    assert f"removed metrics.jsonl ({n_lines} lines)" in out
    assert holder.get("pid") == killed.pid  # the kernel dropped its lock; the file is taken over
    assert f"took over {run / LOCK_FILE} from pid {killed.pid} on " in out


# --- 2. disk failures ---------------------------------------------------------------------------------


class _FullDisk:
    """A file that takes `room` more bytes, then fails as a full disk does (after writing what fits)."""

    def __init__(self, f, room: int) -> None:
        self._f, self.room = f, room

    def write(self, data) -> int:
        data = data if isinstance(data, str) else bytes(data)
        if len(data) <= self.room:
            self.room -= len(data)
            return self._f.write(data)
        self._f.write(data[: self.room])
        self._f.flush()
        self.room = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def fill_disk_at(monkeypatch, where: str, room: int, run: Path) -> None:
    """Make writes to the files named in `where` ("a|b"), or to the checkpoint directory `where`, hit a
    full disk. Every `open` is patched (not only lmforge's), so this does not depend on how a file is
    written; other files open as usual."""
    if where.startswith("step_"):
        real_save = ckpt_io.save_file

        def save_file(tensors, path, *a, **k):
            if Path(path).parent.name.startswith(f".tmp-{where}"):
                Path(path).write_bytes(b"half a tensor")
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            return real_save(tensors, path, *a, **k)

        monkeypatch.setattr(ckpt_io, "save_file", save_file)
        return
    real_open = builtins.open
    names = where.split("|")

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        faulty = isinstance(path, str | os.PathLike) and Path(path).name in names and "r" not in mode
        return _FullDisk(f, room) if faulty else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


@pytest.mark.parametrize(
    ("where", "room", "named"),
    [
        ("config.yaml|config.yaml.tmp", 10, "config.yaml"),
        ("tokenizer.json|tokenizer.json.tmp", 100, "tokenizer.json"),
        ("metrics.jsonl.tmp", 50, "metrics.jsonl"),  # dropping the lines after the checkpoint on resume
        ("metrics.jsonl", 250, "metrics.jsonl"),  # a record mid-run, torn halfway
        ("train.log", 150, "train.log"),
        ("status.json.tmp", 0, "status.json"),
        ("step_0000006", 0, "step_0000006"),  # safetensors' own error, wrapping ENOSPC
    ],
)
def test_a_full_disk_is_one_line_and_nothing_is_lost(
    tiny_data, tmp_path, four_steps, monkeypatch, capsys, where, room, named
):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    with open(run / "metrics.jsonl", "a") as f:  # what a crash after the last checkpoint leaves
        f.write(json.dumps({"type": "train", "step": 5, "train_loss": 9.0}) + "\n")
    old_config = (run / "config.yaml").read_bytes()
    fill_disk_at(monkeypatch, where, room, run)
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6", *BASE)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and named in err, err
    assert "free there" in err  # how much room is left is said

    leftovers = [
        p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".old-"))
    ]
    assert leftovers == [] and not (run / LOCK_FILE).exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line
    # old or new, never half
    if named == "config.yaml":
        assert (run / "config.yaml").read_bytes() == old_config
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] in (4, 6)
    assert (run / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()
    assert latest_checkpoint(run).name == "step_0000004"  # the previous checkpoint is the resume point
    verify_checkpoint(latest_checkpoint(run))
    ckpt_io.load_model(run)

    monkeypatch.undo()  # space freed: the same command resumes and finishes, each step logged once
    assert main(train_args(tiny_data, run, "--train.max_steps=6", *BASE)) == 0
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_that_does_not_fit_says_how_much_it_needs(tmp_path, four_steps, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    tensors, state, meta = ckpt_io.load_checkpoint(run / "checkpoints/step_0000004")
    fill_disk_at(monkeypatch, "step_0000006", 0, run)
    with pytest.raises(ckpt_io.CheckpointError) as info:
        ckpt_io.save_checkpoint(run, 6, tensors, state, meta)
    message = str(info.value)
    found = re.search(r"needs about ([0-9.]+) KB, ([0-9.]+) (KB|MB|GB|TB) free there", message)
    assert found, message
    on_disk = sum(f.stat().st_size for f in (run / "checkpoints/step_0000004").glob("*.safetensors"))
    assert abs(float(found.group(1)) * 1000 - on_disk) < 0.05 * on_disk  # the tensors, headers aside
    assert "resume from step_0000004 (it is intact)" in message
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk(tiny_data, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("mount is not permitted here")
    try:
        run = disk / "run"
        assert main(train_args(tiny_data, run, "--train.max_steps=2", *BASE)) == 0
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 100_000))  # room for logs, not for a checkpoint
        capsys.readouterr()
        assert main(train_args(tiny_data, run, "--train.max_steps=4", *BASE)) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "No space left on device" in err
        assert "could not write checkpoint" in err and "resume from step_0000002" in err
        assert not list((run / "checkpoints").glob(".tmp-*"))
        assert latest_checkpoint(run).name == "step_0000002"
        ckpt_io.load_model(run)
        (disk / "filler").unlink()
        assert main(train_args(tiny_data, run, "--train.max_steps=4", *BASE)) == 0
        assert train_steps(run) == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --- 3. verified metadata -------------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["step", "loader", "missing"])
def test_edited_or_missing_metadata_falls_back_with_a_warning(tiny_data, tmp_path, four_steps, capsys, edit):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    meta_path = run / "checkpoints/step_0000004/meta.json"
    meta = json.loads(meta_path.read_text())
    if edit == "step":
        meta["step"] = 3
    elif edit == "loader":
        meta["loader"]["position"] += 7
    if edit == "missing":
        meta_path.unlink()
    else:
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))  # valid JSON, plausible values
        with pytest.raises(ckpt_io.CheckpointError, match="does not match its checksum"):
            ckpt_io.load_model(run / "checkpoints/step_0000004")  # eval, generate and export check it too
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6", *BASE)) == 0
    out = capsys.readouterr().out
    assert f"checkpoint step_0000004 is unusable: {meta_path}" in out
    assert "falling back to step_0000002" in out and "(step 2," in out
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert verify_checkpoint(latest_checkpoint(run))["step"] == 6


def test_metadata_written_before_the_digest_still_loads(tiny_data, tmp_path, four_steps, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    meta_path = run / "checkpoints/step_0000004/meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == 2 and meta[ckpt_io.META_DIGEST] == ckpt_io.meta_digest(meta)
    del meta[ckpt_io.META_DIGEST]
    meta_path.write_text(json.dumps(meta))  # format 2 without its digest: damaged, refused
    with pytest.raises(ckpt_io.CheckpointError, match="has no checksum"):
        verify_checkpoint(meta_path.parent)
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))  # what lmforge wrote before the digest: accepted
    assert verify_checkpoint(meta_path.parent)["step"] == 4
    capsys.readouterr()
    assert main(train_args(tiny_data, run, "--train.max_steps=6", *BASE)) == 0
    assert "(step 4," in capsys.readouterr().out


def test_a_rotation_killed_halfway_is_cleaned_on_the_next_start(
    tiny_data, tmp_path, four_steps, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *a, **k):  # the kill lands after the first file is gone
        if Path(path).name.startswith("step_"):
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", killed_rmtree)
    args = ["--train.max_steps=6", "--checkpoint.keep_last=2", *BASE]
    main(train_args(tiny_data, run, *args))
    monkeypatch.undo()
    half = run / "checkpoints/step_0000002"
    assert half.is_dir() and not (half / "meta.json").exists()  # never mistaken for a checkpoint

    capsys.readouterr()
    assert main(train_args(tiny_data, run, *args)) == 0
    assert "removed step_0000002" in capsys.readouterr().out
    assert not half.exists()
    assert [p.name for p in ckpt_io.step_checkpoints(run)] == ["step_0000004", "step_0000006"]
