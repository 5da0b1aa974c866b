"""One owner per on-disk format: the run directory (run_dir.py) and the data folder (data/folder.py).

Every file a run writes is named by RunDir; checkpoint metadata keeps its keys; readers of a data folder
do not import the preparation pipeline; the data modules import no circle; eval's default stride comes
from the data folder's val_windows.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import checkpoint as ckpt_io
from lmforge.data import load_meta
from lmforge.data.folder import META_FILE, fingerprint, val_windows
from lmforge.eval.run import EvalOptions, evaluate_run
from lmforge.run_dir import RunDir

SRC = Path(__file__).resolve().parents[1] / "src"
RUN_NAMES = list(RunDir.names())  # a new entry of RunDir is seen here with no other change


def unnamed_files(run: Path) -> list[str]:
    """Entries of a run directory (and of its checkpoints folder) that RunDir does not name."""
    names = {getattr(RunDir, attr) for attr in RUN_NAMES}
    stray = [p.name for p in run.iterdir() if p.name not in names]
    marks = {RunDir(run).best.name, RunDir(run).latest_marker.name}
    steps = {p.name for p in RunDir(run).step_checkpoints()}
    stray += [p.name for p in RunDir(run).checkpoints.iterdir() if p.name not in marks | steps]
    return stray


def test_every_file_a_run_writes_is_named_by_run_dir(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert unnamed_files(run) == []
    files = RunDir(run)
    # the names existing runs were written with (a renamed file would orphan them)
    assert files.metrics == run / "metrics.jsonl" and files.config == run / "config.yaml"
    assert files.checkpoint(40) == run / "checkpoints" / "step_0000040" == files.latest_checkpoint()
    assert files.checkpoint(40, name="best") == files.best == run / "checkpoints" / "best"
    assert files.read_metrics() == ckpt_io.read_metrics(run) and files.read_metrics()[-1]["step"] == 40
    assert files.read_config()["train"]["max_steps"] == 40 and files.read_status()["state"] == "finished"
    # negative control: a file the run directory object does not know is found
    (run / "notes.txt").write_text("x")
    (files.checkpoints / "backup").mkdir()
    assert unnamed_files(run) == ["notes.txt", "backup"]


def test_status_is_replaced_whole_and_a_broken_one_reads_as_none(tmp_path):
    files = RunDir(tmp_path)
    assert files.read_status() == {}
    files.write_status({"state": "running", "step": 3})
    assert files.read_status() == {"state": "running", "step": 3}
    files.status.write_text('{"state": "runn')  # torn by a crash of an older version
    assert files.read_status() == {}
    files.status.write_text("[1, 2]")
    assert files.read_status() == {}


def test_checkpoint_meta_keeps_its_keys(trained_run):
    ckpt = RunDir(trained_run).latest_checkpoint()
    meta = ckpt_io.verify_checkpoint(ckpt)
    assert set(meta) == {
        "config",
        "tokens",
        "tokenizer_sha256",
        "tokenizer_id",
        "data_fingerprint",
        "loader",
        "rng",
        "precision",
        "guards",
        "world_size",
        "sharded",
        "optimizer_groups",
        "format_version",
        "step",
        "files",
        "meta_sha256",
    }
    assert set(meta["guards"]) == {"bad_steps", "early_stop"} and meta["sharded"] is False
    # what the writer gathers, sealed again, is the file's content to the byte
    body = {k: v for k, v in meta.items() if k not in ("format_version", "step", "files", "meta_sha256")}
    assert ckpt_io.sealed_meta(body, meta["step"], meta["files"]) == meta
    assert json.loads((ckpt / ckpt_io.META_FILE).read_text()) == meta


def test_the_data_folder_format_describes_what_prepare_wrote(tiny_data):
    meta = load_meta(tiny_data)
    assert fingerprint(meta["tokenizer_sha256"], meta["shard_sha256"]) == meta["fingerprint"]
    assert fingerprint(meta["tokenizer_sha256"], {}) != meta["fingerprint"]  # negative control
    assert (tiny_data / META_FILE).is_file() and val_windows(meta) is None


@pytest.mark.parametrize(
    "windows,expected",
    [
        ({"seq_len": 32, "stride": 8}, (32, 8)),
        (None, None),
        ({"seq_len": 32}, None),
        ({"seq_len": 16, "stride": 32}, None),  # a stride past the window is not windows prepare writes
        ({"seq_len": True, "stride": 1}, None),
        ("32/8", None),
    ],
)
def test_val_windows_reads_only_what_prepare_writes(windows, expected):
    assert val_windows({"val_windows": windows}) == expected


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_readers_of_a_data_folder_do_not_import_the_pipeline():
    check = "import sys, {mods}; bad = [m for m in {heavy} if m in sys.modules]; sys.exit(repr(bad) if bad else 0)"
    readers = "lmforge.data.loader, lmforge.data.batches, lmforge.data.folder"
    heavy = ["lmforge.data.prepare", "lmforge.data.sources", "lmforge.data.encode", "lmforge.data.hub"]
    done = _run_python(check.format(mods=readers, heavy=heavy))
    assert done.returncode == 0, done.stderr
    # `import lmforge.data` alone loads neither the pipeline nor numpy, tokenizers or torch
    heavy += ["numpy", "tokenizers", "torch", "lmforge.data.tokenizer", "lmforge.data.shards"]
    done = _run_python(check.format(mods="lmforge.data; lmforge.data.load_meta", heavy=heavy))
    assert done.returncode == 0, done.stderr
    # negative control: the check does see the pipeline when it is imported
    done = _run_python(check.format(mods="lmforge.data.prepare", heavy=heavy[:1]))
    assert done.returncode != 0 and "lmforge.data.prepare" in done.stderr


def test_status_and_the_run_lock_start_without_torch():
    code = "import sys, lmforge.watch, lmforge.runlock, lmforge.run_dir; sys.exit('torch' in sys.modules)"
    assert _run_python(code).returncode == 0, "torch was imported"


def test_the_package_prepare_stays_the_function_whatever_is_imported_first():
    code = "import lmforge.data.prepare as m; from lmforge.data import prepare; assert callable(prepare), prepare"
    done = _run_python(code)
    assert done.returncode == 0, done.stderr


def import_cycles(package: Path, name: str) -> list[set[str]]:
    """Groups of modules of `package` that import one another, directly or not (imports inside functions
    count: they are circles all the same, only later)."""
    modules = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = f"{name}.{base}" if base else name
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                head, _, leaf = target.rpartition(".")
                if head == name and leaf in modules and leaf != mod:
                    edges[mod].add(leaf)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = []
    for mod in sorted(modules):
        group = {m for m in reach(mod) if mod in reach(m)}
        if group and group not in cycles:
            cycles.append(group)
    return cycles


def test_the_data_modules_import_no_circle(tmp_path):
    assert import_cycles(SRC / "lmforge" / "data", "lmforge.data") == []
    # negative control: a circle through an import inside a function is found
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("x = 1\ndef f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from .a import x\n")
    assert import_cycles(pkg, "pkg") == [{"a", "b", "c"}]


def with_val_windows(tiny_data: Path, tmp_path: Path, windows: dict | None) -> Path:
    """A copy of the data folder whose meta.json records `windows` as prepare --seq-len/--stride does."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / META_FILE).read_text())
    (data / META_FILE).write_text(json.dumps({**meta, "val_windows": windows}))
    return data


@pytest.mark.parametrize(
    "windows,stride,expected",
    [
        ({"seq_len": 32, "stride": 4}, None, 4),  # windows of the model's length: their stride
        ({"seq_len": 16, "stride": 4}, None, 16),  # other windows: half the model's window
        (None, None, 16),  # none recorded: half the window
        ({"seq_len": 32, "stride": 4}, 8, 8),  # --stride wins
    ],
)
def test_eval_takes_its_default_stride_from_val_windows(
    trained_run, tiny_data, tmp_path, windows, stride, expected
):
    data = with_val_windows(tiny_data, tmp_path, windows)
    opts = EvalOptions(data=str(data), stride=stride, batches=1, batch_size=2, speed=False)
    lm = evaluate_run(trained_run, opts)["lm"]
    assert lm["window"] == 32 and lm["stride"] == expected
    # the stride is the one scored with, not only reported: a stride of 4 gives other sliding numbers
    if expected == 4:
        half = evaluate_run(
            trained_run, EvalOptions(data=str(data), stride=16, batches=1, batch_size=2, speed=False)
        )
        assert lm["sliding_loss"] != half["lm"]["sliding_loss"] and lm["loss"] == half["lm"]["loss"]
