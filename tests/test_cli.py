"""The command line is made from typed functions: the flag rules, one parse, and one set of sampling defaults."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Annotated

import pytest
from rich.console import Console
from starlette.testclient import TestClient

from lmforge import cli
from lmforge.api import LLM
from lmforge.cli import command_parser, main
from lmforge.eval.run import EvalError, EvalOptions
from lmforge.generate.chat import ChatSession
from lmforge.options import Run, SamplingParams, Without
from lmforge.serve.app import create_app

SAMPLING = [f.name for f in dataclasses.fields(SamplingParams)]


def help_defaults(command: str) -> dict[str, str]:
    """flag -> the default its `lmforge COMMAND --help` shows, for the sampling flags, read from the text."""
    text = " ".join(command_parser(cli.COMMANDS[command]).format_help().split())
    found = {}
    for name in SAMPLING:
        flag = "--" + name.replace("_", "-")
        m = re.search(rf"  ?{flag} [A-Z_]+ .*?default: ([^)]*)\)", text)
        if m:
            found[flag] = m.group(1)
    return found


def test_generate_chat_serve_and_eval_show_the_same_sampling_defaults():
    shown = {command: help_defaults(command) for command in ("generate", "chat", "serve", "eval")}
    assert len(shown["generate"]) == len(SAMPLING)  # the reader finds every flag
    assert shown["chat"] == shown["serve"] == shown["generate"]
    assert shown["eval"] == {f: shown["generate"][f] for f in shown["eval"]} and len(shown["eval"]) == 4
    expected = SamplingParams()
    for command in ("generate", "chat", "serve", "eval"):
        defaults = command_parser(cli.COMMANDS[command]).get_defaults()
        for name in SAMPLING:
            if name in defaults:
                assert defaults[name] == getattr(expected, name), (command, name)
    assert shown["generate"]["--temperature"] == str(expected.temperature)


def test_the_help_reader_sees_a_different_default():
    # Negative control: a command whose sampling default differs shows up in the comparison.
    def other(run: Run, sampling: SamplingParams, *, console: Console) -> None:
        """A command."""

    parser = command_parser(other)
    parser.set_defaults(temperature=0.7)
    assert "default: 0.7)" in " ".join(parser.format_help().split())
    assert "default: 0.7)" not in " ".join(command_parser(cli.COMMANDS["chat"]).format_help().split())


def test_the_python_api_eval_and_chat_sessions_default_to_the_same_sampling():
    expected = SamplingParams()
    for method in (LLM.generate, LLM.stream, LLM.batch_generate, LLM.chat):
        params = inspect.signature(method).parameters
        for name in SAMPLING:
            if name in params and name not in ("stop", "seed"):
                assert params[name].default == getattr(expected, name), (method.__name__, name)
    assert inspect.signature(LLM.session).parameters["max_new_tokens"].default == expected.max_new_tokens
    assert EvalOptions().sampling == expected
    with pytest.raises(EvalError, match="top_p, stop: eval's generation check samples with temperature"):
        EvalOptions(sampling=SamplingParams(top_p=0.9, stop=["x"]))  # not applied there: refused, not ignored
    assert ChatSession(llm=None).params == expected


class Recorder(LLM):
    """An LLM (a tiny random model) that keeps the sampling settings each request was served with."""

    def __init__(self) -> None:
        from lmforge.data.tokenizer import train_tokenizer
        from lmforge.model import GPT, ModelConfig

        tok = train_tokenizer(["x y z"] * 10, "bpe", 300)
        cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=64, vocab_size=tok.vocab_size)
        super().__init__(GPT(cfg).eval(), tok, name="stub")
        self.params: list[SamplingParams] = []

    def request_fields(self, prompt, max_new_tokens, params, seed=None, stop=None):
        assert max_new_tokens == params.max_new_tokens
        self.params.append(params)
        return super().request_fields(prompt, max_new_tokens, params, seed, stop)


def served_with(body: dict, **app_kwargs) -> SamplingParams:
    llm = Recorder()
    with TestClient(create_app(llm, **app_kwargs)) as client:
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, **body})
    assert response.status_code == 200, response.text
    return llm.params[0]


def test_a_request_gets_the_servers_sampling_for_what_it_leaves_out():
    # the same defaults as generate and chat (max_tokens=1 keeps the tiny generations short)
    assert served_with({}) == dataclasses.replace(SamplingParams(), max_new_tokens=1)
    server = SamplingParams(temperature=0.3, top_k=7, max_new_tokens=20, stop=["\n"])
    assert served_with({"max_tokens": None}, sampling=server) == server
    given = served_with({"temperature": 0, "top_k": None, "max_tokens": 5, "stop": "#"}, sampling=server)
    assert given == dataclasses.replace(server, temperature=0, top_k=None, max_new_tokens=5, stop=["#"])
    capped = served_with(
        {"max_tokens": None}, max_tokens=16, sampling=server
    )  # --max-tokens caps the default length too
    assert capped.max_new_tokens == 16


def toy(
    names: list[str],
    run: Run,
    sampling: Annotated[SamplingParams, Without("stop")],
    *,
    batch_size: int = 8,
    loud: bool = False,
    tag: list[str] | None = None,
    console: Console,
) -> int:
    """A toy command.

    Args:
        names: some names
        batch_size: how many at once
        loud: say more
        tag: a tag (repeatable)
    """
    console.print(f"{names} {run.run} {sampling.temperature} {batch_size} {loud} {tag}", highlight=False)
    return 7


def test_signature_rules_dashes_switches_repeats_positional_lists_and_groups(monkeypatch, capsys):
    parser = command_parser(toy)
    argv = ["a", "b", "--run", "r", "--batch-size", "3", "--loud", "--tag", "###", "--tag", "[x]"]
    ns = parser.parse_args(argv)
    assert ns.names == ["a", "b"] and ns.batch_size == 3 and ns.loud is True
    assert ns.tag == ["###", "[x]"]  # each value as written (not read as YAML: a comment, a list)
    assert parser.parse_args(["a", "--run", "r"]).loud is False
    monkeypatch.setitem(cli.COMMANDS, "toy", toy)
    assert main(["toy", "a", "--run", "r", "--temperature", "0", "--tag", "t"]) == 7
    assert capsys.readouterr().out.strip() == "['a'] r 0.0 8 False ['t']"
    for wrong, said in [
        (["--batch_size", "3"], "unknown option --batch_size (did you mean --batch-size?)"),
        (["--stop", "x"], "unknown option --stop"),  # Without("stop"): not a flag of this command
        (["--temperature", "-1"], "temperature=-1.0: must be a number >= 0"),
    ]:
        assert main(["toy", "a", "--run", "r", *wrong]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
    assert main(["toy", "a"]) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: missing --run"


def test_every_flag_of_every_command_has_help():
    for name, fn in cli.COMMANDS.items():
        parser = command_parser(fn)
        bare = [
            a.dest
            for a in parser._actions
            if a.dest not in ("help", "config") and "." not in a.dest and not (a.help or "").strip()
        ]
        bare = [d for d in bare if d not in {f.name for f in dataclasses.fields(cli.Config)}]
        assert not bare, f"lmforge {name}: no help for {bare}"


def test_a_preset_is_applied_in_the_one_parse(monkeypatch, tmp_path):
    calls = []
    real = cli.build_parser

    def counting(only=None):
        root, parsers = real(only)
        parse_args = root.parse_args
        monkeypatch.setattr(root, "parse_args", lambda *a, **k: calls.append(a) or parse_args(*a, **k))
        return root, parsers

    monkeypatch.setattr(cli, "build_parser", counting)
    f = tmp_path / "c.yaml"
    f.write_text("preset: gpt2-124m\n")
    _, ns, _ = cli.parse(["train", "--preset", "tiny", "--config", str(f)])
    assert len(calls) == 1
    assert ns.model.n_embd == 768  # the file's preset, given last, is the one the parse keeps
    _, ns, _ = cli.parse(["train", "--config", str(f), "--preset", "tiny", "--model.n_layer=3"])
    assert (ns.preset, ns.model.n_embd, ns.model.n_layer) == ("tiny", 256, 3)
    _, ns, _ = cli.parse(["bench", "--preset", "tiny"])
    assert ns.model.n_embd == 256 and len(calls) == 3


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_a_one_line_summary_and_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert cli.COMMANDS[command].__doc__.splitlines()[0].strip() in " ".join(capsys.readouterr().out.split())


def test_every_import_inside_a_command_resolves():
    # A command imports its heavy modules when it runs: a wrong name there would only fail at that moment.
    import ast
    import importlib.util
    from pathlib import Path

    import lmforge.commands

    checked = 0
    for path in Path(lmforge.commands.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                module = importlib.import_module("." * node.level + (node.module or ""), "lmforge.commands")
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{module.__name__}.{alias.name}"
                    ), f"{path.name}: from {'.' * node.level}{node.module} import {alias.name}"
                    checked += 1
    assert checked > 30


def a_stop_inside(text: str) -> str:
    """Two characters that first appear after the start of text (so stopping there cuts it short)."""
    return next(text[k : k + 2] for k in range(1, len(text) - 1) if text.index(text[k : k + 2]) == k)


def test_stop_and_seed_of_the_sampling_settings_apply_where_the_call_gives_none(tiny_data, tmp_path):
    # `lmforge chat --stop/--seed` reach the model this way: ChatSession passes its params, no stop.
    from tests.gen_helpers import make_run

    llm = LLM.load(make_run(tiny_data, tmp_path / "run"), device="cpu")
    seeded = SamplingParams(temperature=1.0, top_k=None, max_new_tokens=24, seed=3)
    full = llm.complete(["the"], 24, seeded)[0].text
    assert llm.complete(["the"], 24, seeded)[0].text == full  # the params' seed was used
    cut = a_stop_inside(full)
    stopped = llm.complete(["the"], 24, dataclasses.replace(seeded, stop=[cut]))[0].text
    assert stopped == full[: full.index(cut)]
    assert llm.complete(["the"], 24, dataclasses.replace(seeded, stop=[cut]), stop=[])[0].text == full
    reply = "".join(llm.session(24, seeded).send("hi"))
    assert "".join(llm.session(24, seeded).send("hi")) == reply
    cut = a_stop_inside(reply)
    session = llm.session(24, dataclasses.replace(seeded, stop=[cut]))
    assert "".join(session.send("hi")) == reply[: reply.index(cut)].strip()
