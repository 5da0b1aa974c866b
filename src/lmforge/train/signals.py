"""Preemption: SIGINT, SIGTERM, SIGUSR1 and SIGHUP ask the loop to save and stop at the next step boundary.

Cluster schedulers send SIGTERM (or a user-chosen signal such as SIGUSR1) some time before killing a job;
Ctrl-C sends SIGINT (a second Ctrl-C stops at once); a closed terminal (an ssh session that dropped) sends
SIGHUP, and the run's output going nowhere (`| head` that has its lines) stops it the same way. The handler only sets a flag, so a signal never interrupts a half-done optimizer
step or checkpoint write; the loop checks the flag after each step (and after an evaluation).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

PREEMPT_SIGNALS = tuple(
    s
    for s in (
        signal.SIGINT,
        signal.SIGTERM,
        getattr(signal, "SIGUSR1", None),
        getattr(signal, "SIGHUP", None),
    )
    if s is not None
)

# Test-only hook: "SIGNAME@STEP" or "SIGNAME@eval:STEP" makes the loop send itself that signal after
# optimizer step STEP (or inside the evaluation at STEP), so tests can hit an exact step. Never set it
# in real runs.
TEST_SIGNAL_ENV = "LMFORGE_TEST_SIGNAL_AT"
TEST_SIGNAL_RANK_ENV = "LMFORGE_TEST_SIGNAL_RANK"


class StopFlag:
    """Installs flag-setting handlers on entry and restores the previous handlers on exit."""

    def __init__(self, signals: tuple[int, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        self.received = signum

    def __enter__(self) -> StopFlag:
        # Signal handlers can only be set from the main thread; elsewhere (e.g. a notebook worker
        # thread) the run simply keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def name(self) -> str:
        """Name of the received signal (e.g. SIGTERM)."""
        return signal.Signals(self.received).name if self.received is not None else ""


def signal_hook_for_tests() -> tuple[int, str, int] | None:
    """(signal, "step" | "eval", step) from LMFORGE_TEST_SIGNAL_AT, for tests only; None when unset."""
    spec = os.environ.get(TEST_SIGNAL_ENV)
    only_rank = os.environ.get(TEST_SIGNAL_RANK_ENV)  # deliver to this rank alone (multi-process tests)
    if not spec or (only_rank is not None and only_rank != os.environ.get("RANK", "0")):
        return None
    name, _, where = spec.partition("@")
    phase, _, step = where.rpartition(":")
    return int(signal.Signals[name]), phase or "step", int(step)


def test_signal_listener() -> Callable[[str, int], None] | None:
    """For tests: a run-log listener that sends this process the signal LMFORGE_TEST_SIGNAL_AT names
    (SIGNAL@STEP after that step, SIGNAL@eval:STEP as that evaluation starts); None when unset."""
    spec = signal_hook_for_tests()
    if spec is None:
        return None
    signum, phase, at = spec

    def listen(event: str, step: int) -> None:
        if event == phase and step == at:
            os.kill(os.getpid(), signum)

    return listen
