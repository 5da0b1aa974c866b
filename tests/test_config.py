"""Config errors are one line naming the key; overrides and presets land where they should."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lmforge.cli import main, parse, parse_config
from lmforge.config import ConfigError
from lmforge.config_io import load_yaml_config
from lmforge.model import ModelConfig
from lmforge.presets import PRESETS


def config_of(argv):
    command, ns, parsers = parse(["train", *argv])
    return parse_config(ns, parsers["train"], argv)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model.n_embd=256", "--model.n_head=7"], "model.n_embd=256 is not divisible by model.n_head=7"),
        (["--model.n_head=8", "--model.n_kv_head=3"], "model.n_head=8 is not divisible by model.n_kv_head=3"),
        (["--train.lr=0"], "train.lr=0.0: must be in (0, 1]"),
        (["--train.lr=-1e-3"], "train.lr=-0.001: must be in (0, 1]"),
        (["--train.lr=1e300"], "train.lr=1e+300: must be in (0, 1]"),
        (["--train.seed=-1"], "train.seed=-1: must be in [0, 2^32)"),
        (["--train.seed=99999999999"], "train.seed=99999999999: must be in [0, 2^32)"),
        (["--train.eps=0"], "train.eps=0.0: must be > 0"),
        (["--model.init_std=-1"], "model.init_std=-1.0: must be a positive number"),
        (["--model.norm_eps=-1"], "model.norm_eps=-1.0: must be a positive number"),
        (["--model.rope_theta=0"], "model.rope_theta=0.0: must be a positive number"),
        (["--model.norm_eps=nan"], "model.norm_eps"),
        (["--model.seq_len=4096"], "model.seq_len=4096: must be between 1 and the model's context"),
        (["--model.n_layr=3"], "unknown config key model.n_layr (did you mean model.n_layer?)"),
        (["--trian.lr=3"], "unknown config key trian.lr (did you mean train.lr?)"),
        (["--train.max_steps=abc"], "train.max_steps='abc': must be int or null"),
        (["--train.lr=fast"], "train.lr='fast': must be float"),
        (["--train.micro_batch_size=big"], "train.micro_batch_size='big': must be int or 'auto'"),
        (["--model.family=gpt3"], "model.family='gpt3': must be 'gpt2' or 'llama'"),
        (["--preset=tinny"], "preset='tinny' is unknown (did you mean 'tiny'?)"),
        (["--train.device=tpu"], "train.device='tpu'"),
        (["--train.micro_batch_size=3", "--train.global_batch_size=8"], "train.global_batch_size=8"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(argv, expected, capsys, tmp_path):
    code = main(["train", "--data", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_yaml_section_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    assert main(["train", "--config", str(bad), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lmforge: error: model: [1, 2] is not a section of keys: write it as 'model:' followed by indented "
        "'key: value' lines"
    )


def test_unknown_key_in_yaml_gets_a_suggestion(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n  n_hed: 4\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown config key model.n_hed (did you mean model.n_head?)" in capsys.readouterr().err


def test_overrides_win_over_yaml_which_wins_over_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: gpt2-124m\nmodel:\n  n_layer: 4\ntrain:\n  lr: 1.0e-3\n  max_steps: 50\n")
    cfg = config_of(["--config", str(f), "--train.max_steps=200", "--eval.every=7", "--checkpoint.every=9"])
    assert cfg.model.n_layer == 4  # yaml over preset
    assert cfg.model.n_embd == 768  # preset over dataclass default
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 200  # command line over yaml
    assert cfg.eval.every == 7 and cfg.checkpoint.every == 9


def test_family_defaults_resolve_after_overrides():
    cfg = config_of(["--model.family=llama", "--model.n_head=8", "--model.n_kv_head=2"])
    m = cfg.model
    assert (m.pos_emb, m.norm, m.mlp, m.bias, m.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False, False)
    assert m.n_kv_head == 2 and m.seq_len == m.context_len
    gpt = config_of([]).model
    assert (gpt.pos_emb, gpt.norm, gpt.mlp, gpt.bias, gpt.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )


def test_every_shipped_config_and_preset_is_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        cfg = config_of(["--config", str(path)])
        assert cfg.preset in PRESETS, path
    for _name, keys in PRESETS.items():
        ModelConfig(**keys).resolved()


def test_saved_config_round_trips(tmp_path):
    cfg = config_of(["--preset=modern-tiny", "--train.max_steps=5"])
    from lmforge.config_io import config_to_dict

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_yaml_config(path) == cfg


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("prepare", "train", "generate", "quickstart"):
        assert command in out.stdout


def _yaml(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return str(f)


def test_the_budget_given_at_the_highest_level_wins_and_both_at_one_level_is_an_error(tmp_path):
    tokens_yaml = _yaml(tmp_path, "train:\n  max_tokens: 700000\n")
    cfg = config_of(["--config", tokens_yaml, "--train.max_steps=40"])
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (40, None)  # flag beats the YAML's token budget
    assert cfg.train.steps_for(2048) == 40
    cfg = config_of(["--config", tokens_yaml])
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (None, 700000)
    assert cfg.train.steps_for(2048) == 342  # ceil(700000 / 2048)
    steps_yaml = _yaml(tmp_path, "train:\n  max_steps: 50\n")
    cfg = config_of(["--config", steps_yaml, "--train.max_tokens=4096"])
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (None, 4096)
    assert config_of([]).train.steps_for(2048) == 1000  # neither given: the default
    with pytest.raises(ConfigError, match="both given by the command line"):
        config_of(["--train.max_steps=3", "--train.max_tokens=5000"])
    both_yaml = _yaml(tmp_path, "train:\n  max_steps: 3\n  max_tokens: 5000\n")
    with pytest.raises(ConfigError, match="both given by --config"):
        config_of(["--config", both_yaml])
    # ... unless the command line settles it
    assert config_of(["--config", both_yaml, "--train.max_steps=7"]).train.max_steps == 7


def test_configs_saved_before_the_budget_was_one_setting_still_load():
    from lmforge.config_io import config_from_dict

    cfg = config_from_dict({"train": {"max_steps": 1000, "max_tokens": 700000}})
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (None, 700000)  # max_tokens decided then


def test_max_steps_on_the_command_line_beats_a_config_token_budget_in_a_real_run(tiny_data, tmp_path, capsys):
    from .conftest import FAST, TINY_MODEL

    config = _yaml(tmp_path, "train:\n  max_tokens: 700000\n  warmup_steps: 20\n")
    out = tmp_path / "run"
    args = ["train", "--config", config, "--data", str(tiny_data), "--out", str(out), *TINY_MODEL, *FAST]
    assert main([*args, "--train.max_steps=6", "--eval.every=0", "--checkpoint.every=0"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    printed = capsys.readouterr().out
    assert "budget: train.max_steps=6, from the command line" in printed
    # warmup (20) is longer than the run (6 steps): one warning line says so
    assert "warning: train.warmup_steps=20 is not shorter than the run (6 steps)" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["max_steps"], saved["max_tokens"]) == (6, None)
