"""Which code made a run: the lmforge version and, for a git checkout of lmforge, its commit and whether
the working tree had uncommitted changes. Recorded at every start of a run (metrics.jsonl) and shown in
its report; a pip-installed lmforge has no checkout, and then only the version is known.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import __version__

GIT_TIMEOUT_S = 5.0  # git answers in milliseconds; a hung network filesystem must not hold up a run


def _git(repo: Path, *args: str) -> str | None:
    """git's stdout in `repo`, or None when git is missing, fails or takes too long."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(package_dir: Path | None = None) -> dict:
    """{"lmforge": version, "commit": sha, "dirty": bool}; commit and dirty only when `package_dir` (this
    package by default) is tracked by a git checkout."""
    package_dir = package_dir or Path(__file__).resolve().parent
    out: dict = {"lmforge": __version__}
    # The package's own __init__.py must be tracked: an installed copy inside some other repository
    # (a virtual env in a project folder) would otherwise report that repository's commit.
    if _git(package_dir, "ls-files", "--error-unmatch", "__init__.py") is None:
        return out
    commit = _git(package_dir, "rev-parse", "HEAD")
    status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    if commit and status is not None:
        out.update(commit=commit.strip(), dirty=bool(status.strip()))
    return out
