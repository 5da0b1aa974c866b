"""Guards the loop keeps across steps and checkpoints: non-finite steps and early stopping."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class BadStepGuard:
    """Counts optimizer steps skipped because the loss or gradient norm was not finite."""

    max_consecutive: int
    total: int = 0
    consecutive: int = 0

    def record(self, finite: bool) -> None:
        """Count one step (finite or not)."""
        if finite:
            self.consecutive = 0
        else:
            self.total += 1
            self.consecutive += 1

    @property
    def diverged(self) -> bool:
        """Too many non-finite steps in a row: training cannot recover by skipping."""
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        """JSON-able counters for checkpoint meta."""
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters saved in a checkpoint."""
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


@dataclass
class EarlyStopping:
    """Stop when val loss has not improved by more than min_delta for `patience` evaluations (0 = off).

    Also tracks the best val loss, which decides the `best` checkpoint.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf  # lowest val loss seen (decides the `best` checkpoint)
    best_step: int | None = None
    ref: float = math.inf  # the last val loss that counted as an improvement (by more than min_delta)
    bad_evals: int = 0  # evaluations since then

    def update(self, val_loss: float, step: int) -> bool:
        """Record an evaluation; True when it is the lowest val loss so far."""
        if val_loss < self.ref - self.min_delta:
            self.ref, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        if val_loss < self.best:
            self.best, self.best_step = val_loss, step
            return True
        return False

    @property
    def should_stop(self) -> bool:
        """Patience is used up."""
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        """JSON-able state for checkpoint meta (inf is stored as None)."""
        d = asdict(self)
        for k in ("best", "ref"):
            d[k] = None if math.isinf(d[k]) else d[k]
        return {k: d[k] for k in ("best", "best_step", "ref", "bad_evals")}

    def load_state_dict(self, state: dict) -> None:
        """Restore what a checkpoint saved."""
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.ref = math.inf if state.get("ref") is None else float(state["ref"])
        self.best_step, self.bad_evals = state.get("best_step"), int(state.get("bad_evals", 0))
