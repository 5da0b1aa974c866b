"""FSDP2 and DDP from outside the model: 2 gloo processes (torchrun) against one process, sharded
checkpoints, resume across world sizes, SIGTERM to one rank, consolidation, activation checkpointing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge import checkpoint as ckpt_io
from lmforge.checkpoint import CheckpointError, read_metrics
from lmforge.cli import EXIT_PREEMPTED, main
from lmforge.config import Config, ConfigError, FSDPConfig, ModelConfig, TrainConfig
from lmforge.data import TokenLoader
from lmforge.model import GPT
from lmforge.train.dist_checkpoint import _safe_reader, loader_state_for
from lmforge.train.parallel import apply_activation_checkpointing

from .conftest import TINY_MODEL

COMMON = [
    *TINY_MODEL,
    "--model.seq_len=32",
    "--train.max_steps=4",
    "--eval.every=0",
    "--eval.batches=1",
    "--eval.at_start=false",
    "--log.every=1",
    "--log.progress=false",
    "--train.global_batch_size=4",
    "--train.device=cpu",
    # Layouts are compared in fp32: FSDP2's bf16 policy and autocast round at different points, so in
    # bf16 they would agree only to bf16's precision (tests/test_bf16.py covers that path on its own).
    "--train.precision=fp32",
]


def losses(run):
    return [r["train_loss"] for r in read_metrics(run) if r["type"] == "train"]


def train_here(data, out, *extra):
    """One process, in this interpreter."""
    return main(["train", "--data", str(data), "--out", str(out), *COMMON, *extra])


def torchrun(data, out, *extra, env_extra=None):
    """Two gloo processes on this CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_TEST_SIGNAL")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += ["-m", "lmforge", "train", "--data", str(data), "--out", str(out), *COMMON, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One process, micro-batch 1 x 4 accumulation steps, plain model: the losses every layout must match."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train_here(tiny_data, run, "--train.micro_batch_size=1", "--checkpoint.every=2") == 0
    return run


def test_ddp_two_processes_match_one_process(tiny_data, tmp_path, reference):
    """DDP: micro-batch 2 x 2 ranks sees the same 4 windows per step as the reference's 1 x 4 accumulation."""
    run = tmp_path / "ddp"
    proc = torchrun(tiny_data, run, "--train.micro_batch_size=2", "--train.parallel=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)
    assert len(losses(run)) == 4
    # rank 0 alone wrote the run directory: one metrics line per step, one final checkpoint
    assert (run / "checkpoints" / "step_0000004" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def fsdp_preempted(tiny_data, tmp_path_factory):
    """2-process FSDP2 ZeRO-2 run, micro-batch 1 x 2 accumulation steps x 2 ranks (the reference's global
    batch with half its accumulation); rank 1 alone receives SIGTERM after step 2 (no periodic checkpoints)."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    flags = ["--train.micro_batch_size=1", "--train.parallel=fsdp", "--checkpoint.every=0"]
    proc = torchrun(
        tiny_data,
        run,
        *flags,
        "--fsdp.reshard_after_forward=false",
        env_extra={"LMFORGE_TEST_SIGNAL_AT": "SIGTERM@2", "LMFORGE_TEST_SIGNAL_RANK": "1"},
    )
    return run, flags, proc


@pytest.mark.timeout(300)
def test_fsdp2_zero2_then_zero3_with_accumulation_match_one_process_across_sigterm_and_resume(
    tiny_data, reference, fsdp_preempted
):
    # Steps 1-2: ZeRO-2 with 2 ranks x 2 micro-steps (gradients reduced on the last only) against one
    # process with 4 micro-steps. SIGTERM reaches rank 1 alone; both ranks stop and save step 2.
    run, flags, proc = fsdp_preempted
    assert "accum 2, world 2" in proc.stdout
    assert f"exitcode  : {EXIT_PREEMPTED}" in proc.stderr, proc.stderr[-3000:]  # both ranks exited 75
    assert "received a stop signal on another rank: saved step 2" in proc.stdout  # rank 0 prints
    ckpt = ckpt_io.latest_checkpoint(run)
    assert ckpt.name == "step_0000002"
    meta = ckpt_io.verify_checkpoint(ckpt)  # every shard checksummed, index included
    assert meta["sharded"] and meta["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(meta["files"])
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert losses(run) == pytest.approx(losses(reference)[:2], abs=1e-5)

    # Steps 3-4: the same command resumes the sharded checkpoint, now with ZeRO-3.
    again = torchrun(tiny_data, run, *flags, "--fsdp.reshard_after_forward=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fsdp.reshard_after_forward False -> True" in again.stdout
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)
    assert len(losses(run)) == 4


def test_a_two_process_fsdp_checkpoint_resumes_in_one_process(tiny_data, reference, fsdp_preempted, tmp_path):
    step2 = fsdp_preempted[0] / "checkpoints" / "step_0000002"
    for parallel in ("fsdp", "ddp"):  # resharded onto one FSDP2 rank, or gathered into a plain model
        out = tmp_path / parallel
        assert (
            train_here(
                tiny_data,
                out,
                "--train.micro_batch_size=4",
                f"--train.parallel={parallel}",
                f"--resume={step2}",
            )
            == 0
        )
        assert losses(out) == pytest.approx(losses(reference)[2:], abs=1e-5)


def test_fsdp2_one_process_save_resume_is_bit_exact(tiny_data, tmp_path, monkeypatch):
    flags = ["--train.micro_batch_size=2", "--train.parallel=fsdp", "--checkpoint.every=0"]
    straight = tmp_path / "straight"
    assert train_here(tiny_data, straight, *flags) == 0
    run = tmp_path / "run"
    monkeypatch.setenv("LMFORGE_TEST_SIGNAL_AT", "SIGTERM@2")
    assert train_here(tiny_data, run, *flags) == EXIT_PREEMPTED
    monkeypatch.delenv("LMFORGE_TEST_SIGNAL_AT")
    assert train_here(tiny_data, run, *flags) == 0
    assert losses(run) == losses(straight)  # bit for bit
    assert (run / "checkpoints" / "step_0000004" / ".metadata").is_file()


def test_a_failed_sharded_save_is_one_line_and_the_previous_checkpoint_survives(
    tiny_data, tmp_path, monkeypatch, capsys
):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, []

    def save_then_fill_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save_then_fill_the_disk)
    run = tmp_path / "run"
    flags = ["--train.micro_batch_size=4", "--train.parallel=fsdp", "--checkpoint.every=2"]
    assert train_here(tiny_data, run, *flags) == 2
    assert not dist.is_initialized()  # the failed run left its in-process group, for the next run here
    err = capsys.readouterr().err.strip()
    assert "could not write sharded checkpoint" in err and "No space left" in err and "\n" not in err
    assert ckpt_io.verify_checkpoint(ckpt_io.latest_checkpoint(run))["step"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_consolidate_writes_one_file_generate_and_export_can_load(
    tiny_data, reference, fsdp_preempted, tmp_path, capsys
):
    run = fsdp_preempted[0]  # finished at step 4 by the resume test, or still at step 2
    step = ckpt_io.verify_checkpoint(ckpt_io.latest_checkpoint(run))["step"]
    with pytest.raises(CheckpointError, match="consolidate"):
        ckpt_io.load_model(run)  # a sharded run names the command that makes it loadable
    out = tmp_path / "merged"
    assert main(["consolidate", "--run", str(run), "--out", str(out)]) == 0
    model, cfg, ckpt = ckpt_io.load_model(out)
    assert ckpt == out and (out / "tokenizer.json").is_file()
    merged = load_file(str(out / "model.safetensors"))
    ref = load_file(str(reference / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
    assert merged.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], atol=1e-5, rtol=0)
    fresh = GPT(cfg.model).state_dict()  # negative control: training moved the weights
    assert not torch.allclose(merged["blocks.0.attn.c_attn.weight"], fresh["blocks.0.attn.c_attn.weight"])
    assert main(["consolidate", "--run", str(run), "--out", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_activation_checkpointing_recomputes_blocks_and_keeps_losses(tiny_data, tmp_path):
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=32, context_len=64, vocab_size=64)
    calls = {}
    for mode, k, recomputed in (("none", 2, 0), ("full", 2, 4), ("every_k", 2, 2), ("every_k", 3, 2)):
        model = GPT(cfg)
        chosen = apply_activation_checkpointing(model, mode, k)
        n = [0]
        for block in model.blocks:
            block.mlp.register_forward_pre_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
        calls[(mode, k)] = (n[0], chosen)
        assert n[0] == 4 + recomputed, (mode, k)  # each recomputed block runs forward twice
    assert calls[("every_k", 3)][1] == [0, 3]

    plain, ac = tmp_path / "plain", tmp_path / "ac"
    assert train_here(tiny_data, plain, "--train.micro_batch_size=4") == 0
    assert (
        train_here(tiny_data, ac, "--train.micro_batch_size=4", "--train.activation_checkpointing=full") == 0
    )
    assert losses(ac) == pytest.approx(losses(plain), abs=1e-6)


def test_loader_resumed_on_another_world_size_continues_after_the_consumed_windows(tiny_data):
    two = [TokenLoader(tiny_data, "train", 32, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        for _ in range(3):
            loader.next_batch()
    one = TokenLoader(tiny_data, "train", 32, 4, seed=3)
    one.load_state_dict(loader_state_for(two[0].state_dict(), 1))
    nxt = [loader.next_batch()[0] for loader in two]
    # world 1 reads permutation entries 12..15; world 2 split them 12,14 (rank 0) and 13,15 (rank 1)
    expect = torch.stack([nxt[0][0], nxt[1][0], nxt[0][1], nxt[1][1]])
    assert torch.equal(one.next_batch()[0], expect)
    fresh = TokenLoader(tiny_data, "train", 32, 4, seed=3)  # negative control: not the stream's start
    assert not torch.equal(fresh.next_batch()[0], expect)


def test_sharded_index_with_a_foreign_class_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="posix.system|os.system|not an lmforge checkpoint"):
        _safe_reader(tmp_path).read_metadata()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "parallel", "zero3"),
        ("train", "activation_checkpointing", "some"),
        ("train", "activation_checkpointing_k", 0),
        ("train", "optimizer", "sgd"),
        ("train", "dist_timeout_s", 0),
        ("fsdp", "reshard_after_forward", "yes"),
    ],
)
def test_bad_parallel_settings_are_one_line_naming_the_key(section, key, value):
    cls = TrainConfig if section == "train" else FSDPConfig
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}=") as e:
        cls(**{key: value})
    assert "\n" not in str(e.value)


def test_settings_this_device_cannot_run_are_one_line_before_training(tiny_data, tmp_path, capsys):
    for flags, expect in (
        (["--train.parallel=fsdp", "--fsdp.cpu_offload=true"], "fsdp.cpu_offload=true needs a CUDA GPU"),
        (["--fsdp.cpu_offload=true"], "fsdp.cpu_offload=true needs train.parallel=fsdp"),
    ):
        assert train_here(tiny_data, tmp_path / "run", "--train.micro_batch_size=4", *flags) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_adamw8bit_without_torchao_or_bitsandbytes_is_one_clear_line():
    from lmforge.train.optim import build_optimizer

    try:
        import torchao  # noqa: F401

        pytest.skip("torchao is installed")
    except ImportError:
        pass
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=16, vocab_size=32))
    with pytest.raises(ConfigError, match="pip install torchao"):
        build_optimizer(model, TrainConfig(optimizer="adamw8bit"), "cpu")


def test_config_sections_round_trip():
    cfg = Config(fsdp=FSDPConfig(reshard_after_forward=False), train=TrainConfig(parallel="fsdp"))
    from lmforge.config_io import config_from_dict, config_to_dict

    again = config_from_dict(config_to_dict(cfg))
    assert again.fsdp.reshard_after_forward is False and again.train.parallel == "fsdp"


TIMEOUT_SCRIPT = """
import sys, time, torch, torch.distributed as dist
from lmforge.train.distributed import init_distributed
from lmforge.train.distributed import all_agree, collective_errors, DistributedError
env = init_distributed("cpu", timeout_s=2)
# a stop / NaN / early-stop flag raised on one rank only is seen by both; none raised stays false
one, none = all_agree(env.rank == 1, env, "cpu"), all_agree(False, env, "cpu")
sys.stdout.write(f"AGREE rank {env.rank} {one} {none}\\n")  # one write: the ranks share the pipe
sys.stdout.flush()
try:
    with collective_errors(env, 2):
        if env.rank == 1:  # rank 0 never joins this all-reduce
            dist.all_reduce(torch.ones(1))
except DistributedError as e:
    print("ERROR:", e, flush=True)
if env.rank == 0:
    time.sleep(5)
"""


@pytest.mark.timeout(120)
def test_under_torchrun_a_bad_setting_is_told_once_and_other_errors_name_their_rank(tmp_path):
    bad = torchrun(tmp_path, tmp_path / "run", "--train.lr=fast")  # every rank refuses it alike
    assert [ln for ln in bad.stderr.splitlines() if "lmforge: error" in ln] == [
        "lmforge: error: train.lr='fast': must be float"
    ], bad.stderr[-2000:]
    # data each rank looks for on its own disk
    missing = torchrun(
        tmp_path / "none", tmp_path / "run", "--train.micro_batch_size=2", "--train.parallel=ddp"
    )
    lines = sorted(ln for ln in missing.stderr.splitlines() if "lmforge: error" in ln)
    assert [ln.split(": data folder")[0] for ln in lines] == [
        "lmforge: error: rank 0 of 2",
        "lmforge: error: rank 1 of 2",
    ], missing.stderr[-2000:]


def test_ranks_agree_on_a_flag_and_a_collective_timeout_is_one_line_naming_the_rank(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(TIMEOUT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    agree = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("AGREE"))
    assert agree == ["AGREE rank 0 True False", "AGREE rank 1 True False"], proc.stdout + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1, proc.stdout + proc.stderr[-2000:]
    assert "rank 1 of 2: a collective did not finish within train.dist_timeout_s=2s" in lines[0]
