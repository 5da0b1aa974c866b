"""The training loop's seam and its stop reasons: any batch source (y = -1 outside the loss) trains with
every guarantee; a run that trains nothing, a file where the run folder should be, or a full disk while
consolidating is one line."""

from __future__ import annotations

import torch

from lmforge.checkpoint import read_metrics
from lmforge.cli import EXIT_DIVERGED, EXIT_PREEMPTED, main
from lmforge.data.batches import training_batches

from .conftest import FAST, TINY_MODEL

FLAGS = [*TINY_MODEL, *FAST, "--train.device=cpu", "--train.precision=fp32", "--train.max_steps=6"]
FLAGS += ["--eval.every=0", "--eval.at_start=false", "--train.warmup_steps=1"]


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *FLAGS, *extra])


def _losses(run):
    return [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]


class LastTokenOnly:
    """A batch source that scores only the last position of each window (y = -1 elsewhere)."""

    def __init__(self, inner):
        self.inner = inner

    epoch = property(lambda self: self.inner.epoch)

    def next_batch(self):
        x, y = self.inner.next_batch()
        y = y.clone()
        y[:, :-1] = -1
        return x, y

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_a_batch_source_with_a_loss_mask_trains_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    assert _train(tiny_data, plain) == 0
    monkeypatch.setattr(
        "lmforge.train.loop.training_batches", lambda *a, **k: LastTokenOnly(training_batches(*a, **k))
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_data, straight) == 0
    # the mask reached the loss: same weights and windows, another loss from the first step on
    assert _losses(straight)[0] != _losses(plain)[0]
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@3")
    assert _train(tiny_data, resumed) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    assert _train(tiny_data, resumed) == 0
    assert _losses(resumed) == _losses(straight)  # the source's position is saved and restored, bitwise


def test_a_run_whose_every_step_is_non_finite_ends_diverged_even_when_short(
    tiny_data, tmp_path, monkeypatch, capsys
):
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    # 3 steps, fewer than train.max_bad_steps=5: the consecutive-steps guard alone would never fire
    assert _train(tiny_data, tmp_path / "run", "--train.max_steps=3") == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "training diverged: all 3 steps with a non-finite loss or gradient norm" in err
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # nothing untrained is saved


def test_out_naming_a_file_is_one_line(tiny_data, tmp_path, capsys):
    afile = tmp_path / "taken"
    afile.write_text("mine")
    assert _train(tiny_data, afile) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"lmforge: error: --out '{afile}' is a file: give a folder for the run (new, or one to resume)"
    )
    assert afile.read_text() == "mine"


def test_consolidate_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    import errno

    import safetensors.torch

    run = tmp_path / "sharded"
    assert _train(tiny_data, run, "--train.parallel=fsdp", "--train.max_steps=2") == 0
    out = tmp_path / "merged"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(["consolidate", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not write the consolidated checkpoint" in err and "No space left on device" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written stays
    monkeypatch.undo()
    assert main(["consolidate", "--run", str(run), "--out", str(out)]) == 0  # and it works with room
