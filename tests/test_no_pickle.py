"""No entry point unpickles a file: crafted checkpoints and model folders whose unpickling would create a
marker file are refused in one line (exit 2) and the marker never appears.

The crafted sharded checkpoint is made the way an attacker would: a real FSDP checkpoint whose index gets
a BytesStorageMetadata item (DCP hands such bytes to torch.load(weights_only=False)) pointing at a pickle
appended to the shard, re-published with lmforge's own code so that every checksum matches. Negative
controls show that the payload runs when unpickled and that DCP's stock reader does run it, so only
lmforge's reader stands in the way.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from lmforge import checkpoint as ckpt_io
from lmforge.api import LLM
from lmforge.checkpoint import CheckpointError
from lmforge.cli import main
from lmforge.config_io import config_from_dict
from lmforge.model import GPT
from lmforge.train import dist_checkpoint
from lmforge.train.dist_checkpoint import Checkpointer, _safe_reader
from lmforge.train.distributed import DistEnv

from .conftest import TINY_MODEL

TRAIN = [
    *TINY_MODEL,
    "--model.seq_len=32",
    "--train.max_steps=4",
    "--train.micro_batch_size=4",
    "--train.global_batch_size=4",
    "--train.parallel=fsdp",
    "--train.device=cpu",
    "--checkpoint.every=2",
    "--eval.every=0",
    "--eval.at_start=false",
    "--eval.batches=1",
    "--log.progress=false",
]
TARGET = "model.wte.weight"  # an entry every load reads (the model's template asks for it)


class _Touch:
    """Unpickling this creates `marker`: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Touch(marker))


def republish(ckpt: Path, edit) -> None:
    """Edit a copy of a checkpoint's files, then publish it in place with lmforge's own writer, so every
    checksum in meta.json matches the edited files (what an attacker would do)."""
    meta = ckpt_io.read_meta(ckpt)
    step, _ = meta.pop("step"), meta.pop("files")
    tmp = ckpt.with_name(f".tmp-craft-{ckpt.name}")
    shutil.copytree(ckpt, tmp)
    (tmp / ckpt_io.META_FILE).unlink()
    edit(tmp)
    ckpt_io.publish_checkpoint(tmp, ckpt, step, meta, is_step=ckpt.name.startswith("step_"))
    ckpt_io.verify_checkpoint(ckpt)  # the checksums match: only the loader's own checks can stop it


def plant_in_shards(ckpt: Path, marker: Path, as_bytes: bool = True) -> None:
    """Point TARGET at a pickle appended to the shard: as a bytes item (DCP would torch.load it with
    weights_only=False), or still declared a tensor (as_bytes=False)."""
    metadata = _safe_reader(ckpt).read_metadata()  # our own, untampered index

    def edit(tmp: Path) -> None:
        shard = tmp / "__0_0.distcp"
        blob = payload(marker)
        info = _StorageInfo(shard.name, shard.stat().st_size, len(blob))
        with open(shard, "ab") as f:
            f.write(blob)
        if as_bytes:
            metadata.state_dict_metadata[TARGET] = BytesStorageMetadata()
            kept = {k: v for k, v in metadata.storage_data.items() if k.fqn != TARGET}
            metadata.storage_data = kept | {MetadataIndex(TARGET): info}
        else:
            for key in [k for k in metadata.storage_data if k.fqn == TARGET]:
                metadata.storage_data[key] = info
        (tmp / ckpt_io.SHARDED_INDEX).write_bytes(pickle.dumps(metadata))

    republish(ckpt, edit)


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit 2 with one `lmforge: error:` line holding every needle; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def sharded_run(tiny_data, tmp_path_factory):
    """A real one-process FSDP run stopped at step 2 (sharded checkpoint, resumable to step 4)."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    argv = ["train", "--data", str(tiny_data), "--out", str(run), *TRAIN, "--train.max_steps=2"]
    assert main(argv) == 0
    return run


@pytest.fixture
def hostile_run(sharded_run, tmp_path):
    """(a copy of the run whose latest checkpoint carries the payload, that checkpoint, the marker)."""
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    ckpt, marker = ckpt_io.latest_checkpoint(run), tmp_path / "pwned"
    plant_in_shards(ckpt, marker)
    return run, ckpt, marker


@pytest.fixture(scope="module")
def single_file(sharded_run, tmp_path_factory):
    """The run consolidated into a single-file checkpoint directory (what generate, eval and export read)."""
    out = tmp_path_factory.mktemp("single") / "model"
    assert main(["consolidate", "--run", str(sharded_run), "--out", str(out)]) == 0
    return out


@pytest.fixture
def hostile_single(single_file, tmp_path):
    """A copy of it whose model.safetensors is a pickle, re-published so the checksums match."""
    ckpt, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(single_file, ckpt)
    republish(ckpt, lambda tmp: (tmp / ckpt_io.MODEL_FILE).write_bytes(payload(marker)))
    return ckpt, marker


# --- negative controls: the payloads are real ------------------------------------------------------


def test_the_payload_runs_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(payload(marker))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RuntimeError):  # the pickle runs before torch finds no archive in it
        torch.load(io.BytesIO(payload(marker)), weights_only=False)
    assert marker.exists()


def test_dcps_stock_reader_runs_the_crafted_checkpoint(hostile_run):
    _, ckpt, marker = hostile_run
    cfg = config_from_dict(ckpt_io.verify_checkpoint(ckpt)["config"])
    state = {"model": GPT(cfg.model).state_dict()}
    # DCP unpickles the planted bytes (the marker appears), then fails on what the payload returned.
    with pytest.raises(dcp.api.CheckpointException), dist_checkpoint._quiet_single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
    assert marker.exists()


def test_lmforges_own_sharded_checkpoints_hold_tensors_only_and_load(sharded_run, tmp_path):
    ckpt = ckpt_io.latest_checkpoint(sharded_run)
    index = _safe_reader(ckpt).read_metadata().state_dict_metadata
    assert index and all(isinstance(item, TensorStorageMetadata) for item in index.values())
    assert ckpt_io.read_meta(ckpt)["non_tensor_state"] == {}
    assert main(["consolidate", "--run", str(sharded_run), "--out", str(tmp_path / "ok")]) == 0


# --- sharded checkpoints: every command that reads one ----------------------------------------------

NON_TENSOR = "holds non-tensor (pickled) items"


def test_consolidate_refuses_pickled_items(hostile_run, tmp_path, capsys):
    run, ckpt, marker = hostile_run
    out = tmp_path / "merged"
    err = refused(capsys, ["consolidate", "--run", str(run), "--out", str(out)], NON_TENSOR, "never loads")
    assert str(ckpt / ckpt_io.SHARDED_INDEX) in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("how", ["auto", "path"])
def test_train_resume_refuses_pickled_items(hostile_run, tiny_data, tmp_path, capsys, how):
    import torch.distributed as dist

    run, ckpt, marker = hostile_run
    out, extra = (run, []) if how == "auto" else (tmp_path / "other", [f"--resume={ckpt}"])
    refused(capsys, ["train", "--data", str(tiny_data), "--out", str(out), *TRAIN, *extra], NON_TENSOR)
    assert not marker.exists()
    assert not dist.is_initialized()  # the refused run left no process group behind for the next test


def test_the_index_check_refuses_bytes_items_the_allow_list_let_through(
    hostile_run, tmp_path, capsys, monkeypatch
):
    run, _, marker = hostile_run
    bytes_class = ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata")
    monkeypatch.setattr(dist_checkpoint, "_DCP_CLASSES", dist_checkpoint._DCP_CLASSES | {bytes_class})
    argv = ["consolidate", "--run", str(run), "--out", str(tmp_path / "merged")]
    refused(capsys, argv, NON_TENSOR, f"{TARGET} is a BytesStorageMetadata")
    assert not marker.exists()


def test_the_reader_refuses_bytes_items_dcp_planned(hostile_run, tmp_path, capsys, monkeypatch):
    run, _, marker = hostile_run
    bytes_class = ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata")
    monkeypatch.setattr(dist_checkpoint, "_DCP_CLASSES", dist_checkpoint._DCP_CLASSES | {bytes_class})
    monkeypatch.setattr(dist_checkpoint, "_check_tensors_only", lambda metadata, index: None)
    argv = ["consolidate", "--run", str(run), "--out", str(tmp_path / "merged")]
    refused(capsys, argv, NON_TENSOR, f"{TARGET} is stored as bytes")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's weights-only reader, refusing it
def test_a_tensor_item_holding_a_pickle_is_read_weights_only(sharded_run, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(sharded_run, run)
    plant_in_shards(ckpt_io.latest_checkpoint(run), marker, as_bytes=False)
    argv = ["consolidate", "--run", str(run), "--out", str(tmp_path / "merged")]
    refused(capsys, argv, f"item {TARGET} is not plain tensor data", "never unpickles")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no process group
def test_a_non_tensor_training_value_goes_to_json_not_into_the_shards(tmp_path):
    def model_and_optimizer():
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, opt = model_and_optimizer()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    for state in opt.state.values():
        state["calls"] = 7  # a plain int, like the step count some optimizers keep
    rng = {"rng/torch": torch.get_rng_state()}
    ckpt = Checkpointer(model, opt, DistEnv(), sharded=True).save(tmp_path / "run", 1, {}, rng, None)
    saved = ckpt_io.verify_checkpoint(ckpt)
    assert saved["non_tensor_state"]["optim"]["state"] == {"weight": {"calls": 7}, "bias": {"calls": 7}}
    index = _safe_reader(ckpt).read_metadata().state_dict_metadata  # refuses any non-tensor item

    again, opt2 = model_and_optimizer()
    Checkpointer(again, opt2, DistEnv(), sharded=True).load(ckpt, saved)
    assert torch.equal(again.weight, model.weight) and [s["calls"] for s in opt2.state.values()] == [7, 7]
    assert torch.equal(opt2.state[again.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])

    # Negative control: DCP on its own stores that int as a pickled bytes item.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with dist_checkpoint._quiet_single_process():
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "raw"))
    raw = dcp.FileSystemReader(str(tmp_path / "raw")).read_metadata().state_dict_metadata
    assert isinstance(raw["optim.state.weight.calls"], BytesStorageMetadata)
    assert "optim.state.weight.calls" not in index


# --- single-file checkpoints and model folders: every loader ----------------------------------------

LOADERS = {
    "generate": lambda run, tmp: ["generate", "--run", run, "--device", "cpu", "--prompt", "the"],
    "chat": lambda run, tmp: ["chat", "--run", run, "--device", "cpu"],
    "eval": lambda run, tmp: ["eval", "--run", run, "--device", "cpu", "--out", f"{tmp}/eval.json"],
    "export": lambda run, tmp: ["export", "--run", run, "--format", "safetensors", "--out", f"{tmp}/x"],
    "serve": lambda run, tmp: ["serve", "--run", run, "--device", "cpu", "--port", "0"],
}


@pytest.fixture
def no_server(monkeypatch):
    """`lmforge serve` must fail while loading; should a load ever pass, fail the test instead of serving."""
    pytest.importorskip("uvicorn")
    import lmforge.serve

    monkeypatch.setattr(
        lmforge.serve, "run_server", lambda *a, **k: pytest.fail("the crafted model was loaded")
    )


@pytest.mark.parametrize("command", sorted(LOADERS))
def test_loaders_refuse_a_crafted_sharded_checkpoint(hostile_run, tmp_path, capsys, no_server, command):
    run, _, marker = hostile_run
    refused(capsys, LOADERS[command](str(run), tmp_path / "out"), "sharded checkpoint", "consolidate")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(LOADERS))
def test_loaders_refuse_a_pickle_named_model_safetensors(
    hostile_single, tmp_path, capsys, no_server, command
):
    ckpt, marker = hostile_single
    refused(
        capsys, LOADERS[command](str(ckpt), tmp_path / "out"), "not a safetensors file", "never unpickles"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_llm_load_refuses_both_crafted_checkpoints(hostile_run, hostile_single):
    for run, marker, message in (
        (hostile_run[0], hostile_run[2], "consolidate"),
        (*hostile_single, "not a safetensors file"),
    ):
        with pytest.raises(CheckpointError, match=message):
            LLM.load(run, device="cpu")
        assert not marker.exists()


def test_llm_load_ignores_a_pickle_beside_the_weights(single_file, tmp_path):
    ckpt, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(single_file, ckpt)
    for name in ("pytorch_model.bin", "model.pt"):
        republish(ckpt, lambda tmp, name=name: (tmp / name).write_bytes(payload(marker)))
    assert LLM.load(ckpt, device="cpu").generate("the", max_new_tokens=2, temperature=0) is not None
    assert not marker.exists()


@pytest.mark.parametrize("files", [["pytorch_model.bin"], ["pytorch_model.bin", "model.safetensors"]])
def test_import_hf_refuses_pickled_weights(tiny_data, tmp_path, capsys, files):
    src, marker = tmp_path / "hf", tmp_path / "pwned"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32}))
    shutil.copyfile(tiny_data / "tokenizer.json", src / "tokenizer.json")
    for name in files:
        (src / name).write_bytes(payload(marker))
    need = "not a safetensors file" if "model.safetensors" in files else "no *.safetensors"
    refused(capsys, ["import", f"hf:{src}", "--out", str(tmp_path / "run")], need, "never pickles")
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), f"--init-from=hf:{src}"]
    refused(capsys, argv, need)
    assert not marker.exists() and not (tmp_path / "run").exists()
