"""Safe handling of prepare's output folder: refuse foreign folders, swap in complete ones."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from lmforge.data.errors import DataError
from lmforge.data.folder import MANIFEST_FILE, META_FILE, TOKENIZER_FILE, is_shard_name


def temp_dir_for(out_dir: Path) -> Path:
    """The hidden sibling folder a prepare run of this process writes into before the swap."""
    return out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"


def is_data_dir(path: Path) -> bool:
    """True when ``path`` holds only what prepare writes and a meta.json it wrote."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or "format_version" not in meta:
        return False
    known = {META_FILE, MANIFEST_FILE, TOKENIZER_FILE}
    return all(p.name in known or is_shard_name(p.name) for p in path.iterdir())


def check_out_dir(out_dir: Path) -> None:
    """Refuse (DataError) an out_dir that is a file or a non-empty folder prepare did not write."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"output '{out_dir}' is a file: give a folder path for --out")
    if any(out_dir.iterdir()) and not is_data_dir(out_dir):
        raise DataError(
            f"output folder '{out_dir}' is not empty and is not an lmforge data folder: "
            "refusing to overwrite it; choose another --out or empty it"
        )


def remove_stale_temps(out_dir: Path) -> None:
    """Delete temp folders left by earlier prepare runs of this out_dir that were killed."""
    if os.name != "posix":  # os.kill(pid, 0) is only a liveness probe on POSIX
        return
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.tmp-(\d+)$")
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive but owned by someone else: leave it


def install(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder to out_dir, replacing an old data folder only now."""
    check_out_dir(out_dir)  # again: the folder may have changed while we were tokenizing
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, payload: dict) -> None:
    """Write JSON and fsync it, so a later rename never exposes a half-written file."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
