"""The README and docs/ stay true: links resolve, every documented command parses, the tour runs."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.cli import main

from .conftest import FAST, TINY_MODEL, make_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
TOUR_HEADING = "## A five-minute tour"

# A fenced block: its language and its body (fences may be indented inside list items).
FENCE = re.compile(r"^ *```(\w*)[^\n]*\n(.*?)^ *```", re.M | re.S)
# In these blocks every line is a shell command; in any other block only `$ `-prompted lines are.
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$", re.M)
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SUBCOMMANDS = set(cli.build_parser()[1])


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans, where links and headings live."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation dropped, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", text)):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links of a page whose file, or whose #anchor in that file, does not exist."""
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        if not path:  # #anchor: a heading of this page
            dest, dest_text = page, text
        else:
            dest = (page.parent / path).resolve()
            if not dest.exists() or ROOT not in dest.parents:
                problems.append(f"{page.name}: {target} (no such file in the repository)")
                continue
            dest_text = dest.read_text(encoding="utf-8") if dest.suffix == ".md" else ""
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest_text):
            problems.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return problems


def shell_lines(text: str) -> list[str]:
    """Logical command lines of a page's fenced blocks: continuations joined, prompts stripped."""
    lines = []
    for lang, body in FENCE.findall(text):
        joined = re.sub(r"\\\n", " ", body)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                lines.append(line[2:])
            elif lang in SHELL_LANGS and line and not line.startswith("#"):
                lines.append(line)
    return lines


def lmforge_argvs(line: str) -> list[list[str]]:
    """The argv of each `lmforge ...` (or `... -m lmforge ...`) command in one shell line."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in [*lexer, ";"]:
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    argvs = []
    for tokens in commands:
        for redirect in REDIRECTS & set(tokens):  # `> FILE` is the shell's, not the command's
            i = tokens.index(redirect)
            del tokens[i : i + 2]
        while tokens and ENV_ASSIGNMENT.match(tokens[0]):
            tokens = tokens[1:]
        if tokens[:1] == ["lmforge"]:
            argvs.append(tokens[1:])
        elif "lmforge" in tokens and tokens[tokens.index("lmforge") - 1] == "-m":
            argvs.append(tokens[tokens.index("lmforge") + 1 :])
    return argvs


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every lmforge command in the fenced blocks of the README and docs/."""
    found = []
    for page in PAGES:
        for line in shell_lines(page.read_text(encoding="utf-8")):
            found += [(page.name, argv) for argv in lmforge_argvs(line)]
    return found


def parse_error(argv: list[str]) -> str | None:
    """None when the real CLI parser accepts argv, else its error."""
    try:
        cli.parse(argv)
    except (Exception, SystemExit) as e:  # argparse errors, unknown presets, a missing --config file
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None


@pytest.fixture
def fast_parser(monkeypatch):
    """parse() with the parsers built once: building them takes most of a parse's time. The preset
    defaults parse() sets stay behind, but defaults never make an unknown flag or a bad value parse."""
    monkeypatch.setattr(cli, "build_parser", functools.cache(cli.build_parser))
    monkeypatch.chdir(ROOT)  # `--config configs/tiny.yaml` is read relative to the repository


def test_readme_is_a_front_door_of_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    assert TOUR_HEADING in lines


def test_every_relative_link_and_anchor_resolves():
    problems = [p for page in PAGES for p in broken_links(page, page.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)
    linked = {t.partition("#")[0] for t in LINK.findall(prose(README.read_text(encoding="utf-8")))}
    for page in PAGES[1:]:  # every page is reached from the front door
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def test_link_check_catches_a_missing_file_and_a_missing_anchor():
    # Negative control: the checker is not vacuous.
    page = ROOT / "docs" / "x.md"
    text = "# Title\n[ok](#title) [file](training.md) [gone](nowhere.md) [bad](training.md#no-such)\n"
    problems = broken_links(page, text)
    assert len(problems) == 2 and "nowhere.md" in problems[0] and "#no-such" in problems[1]
    assert broken_links(page, "```bash\n[not](a-link.md)\n```\n`[nor](this.md)`\n") == []


def test_slugs_follow_github_rules():
    assert slug("Checkpoints and resume") == "checkpoints-and-resume"
    assert slug("NCCL: symptoms and the variables that help") == "nccl-symptoms-and-the-variables-that-help"
    assert slug("The `lmforge` command, step 1/2") == "the-lmforge-command-step-12"
    assert anchors("# A\n## A\n```bash\n# comment, not a heading\n```\n") == {"a", "a-1"}


def test_every_documented_command_parses(fast_parser):
    commands = documented_commands()
    failures = [
        f"{page}: lmforge {shlex.join(argv)}\n    {err}"
        for page, argv in commands
        if (err := parse_error(argv))
    ]
    assert not failures, "\n".join(failures)
    # Not vacuous: every subcommand has a documented example, and the extraction finds them in bulk.
    assert {argv[0] for _, argv in commands} == SUBCOMMANDS
    assert len(commands) >= 50


def test_a_renamed_flag_or_subcommand_fails_the_same_check(fast_parser):
    # Negative control: the same extraction and parse reject what the CLI does not have.
    good = "lmforge train --config configs/tiny.yaml --data data/stdlib --out runs/tiny --train.max_steps=200"
    (argv,) = lmforge_argvs(good)
    assert parse_error(argv) is None
    assert parse_error([*argv, "--train.max_stepz=200"])
    assert parse_error(["generate", "--run", "runs/tiny", "--temprature", "0.7"])
    assert parse_error(["trian", "--data", "data/stdlib"])
    assert parse_error(["train", "--config", "configs/no-such.yaml"])


def test_shell_lines_handle_continuations_comments_prompts_and_pipes():
    text = (
        "```bash\n# a comment\nlmforge train --data d \\\n  --out r   # trailing comment\n"
        "LMFORGE_CUDA_GRAPHS=0 lmforge generate --run r --stop $'\\n\\n' > out.txt\n"
        "torchrun --nproc-per-node=8 -m lmforge train --out r\npip install lmforge\n```\n"
        "```text\n$ lmforge status r\nlmforge eval: a table title, not a command\n```\n"
    )
    argvs = [argv for line in shell_lines(text) for argv in lmforge_argvs(line)]
    assert argvs == [
        ["train", "--data", "d", "--out", "r"],
        ["generate", "--run", "r", "--stop", "$\\n\\n"],
        ["train", "--out", "r"],
        ["status", "r"],
    ]


def tour_commands() -> list[list[str]]:
    """The lmforge commands of the README's tour, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(TOUR_HEADING)
    end = text.find("\n## ", start + 1)
    return [argv for line in shell_lines(text[start:end]) for argv in lmforge_argvs(line)]


def test_the_readme_tour_runs_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    """prepare -> train -> generate -> export hf -> prepare --chat -> finetune, with the README tour's own
    command lines, on a small corpus.

    Scaled down by appended flags: a 30-document folder instead of builtin:stdlib, a 2-layer model for 2
    steps, 200 of builtin:stdlib-chat's conversations in 64-token windows, a 2-step fine-tune. `chat` is not run (its line is parsed above): tests/test_use.py runs the real `lmforge chat` in a
    pseudo-terminal. The same stages also run end to end, with other flags, in tests/test_train.py
    (prepare -> train -> generate) and tests/test_export.py (export hf, checked against transformers).
    """
    tour = tour_commands()
    assert [argv[0] for argv in tour] == [
        "prepare", "train", "generate", "chat", "export", "prepare", "finetune", "chat"
    ]  # fmt: skip
    make_corpus(tmp_path / "text")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)  # the tour's relative paths (data/stdlib, runs/tiny, ...) land here
    small = {
        "prepare": ["--vocab-size", "300", "--workers", "1"],
        # Replaces the tour's max_steps (the last value wins), which outranks the YAML's max_tokens.
        "train": [*TINY_MODEL, *FAST, "--train.max_steps=2"],
        "generate": ["--max-new-tokens", "8"],
        # conversations train at the window length they were packed for (64: the tiny run's context)
        "finetune": [*(f for f in FAST if "seq_len" not in f), "--train.max_steps=2"],
    }
    for argv in tour:
        if argv[0] == "chat":
            continue
        argv = [str(tmp_path / "text") if a == "builtin:stdlib" else a for a in argv]
        extra = small.get(argv[0], [])
        if "--chat" in argv:
            extra = ["--max-docs", "300", "--workers", "1", "--seq-len", "64", "--val-fraction", "0.1"]
        capsys.readouterr()  # only this command's output below
        assert main([*argv, *extra]) == 0, argv
        if argv[0] == "generate":
            prompt = argv[argv.index("--prompt") + 1]
            text = capsys.readouterr().out
            assert text.startswith(prompt) and len(text.strip()) > len(prompt.strip())
    export = next(argv for argv in tour if argv[0] == "export")
    out = tmp_path / export[export.index("--out") + 1]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
