"""prepare on hostile input: odd file names and file types, oversized and malicious JSON, empty archives."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from lmforge.data import DataError, prepare, safe_read, stdlib_corpus
from lmforge.data.sources import Skips, iter_documents
from tests.test_prepare import _docs

GOOD = [f"good document number {i}, long enough to tokenize.\n" for i in range(6)]


def _corpus(root: Path) -> Path:
    """A folder of six good documents that every test adds one bad input to."""
    root.mkdir()
    for i, text in enumerate(GOOD):
        (root / f"good{i}.txt").write_text(text)
    return root


def _prepare(root: Path, out: Path, messages: list[str] | None = None) -> dict:
    log = messages.append if messages is not None else None
    return prepare([str(root)], out, vocab_size=300, val_fraction=0.3, workers=1, progress=log)


def _read(source: Path) -> tuple[list[str], Skips]:
    skipped = Skips()
    texts = [d.text for d in iter_documents(str(source), skipped=skipped)]
    return texts, skipped


def test_a_file_name_that_is_not_utf8_is_read_and_shown_escaped(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    bad = os.fsdecode(os.fsencode(root) + b"/caf\xe9.txt")  # Latin-1 bytes: not UTF-8
    Path(bad).write_text("a document whose file name is Latin-1\n")
    (root / "plain.json").write_text(json.dumps({"text": "x"}))  # an ordinary name next to it
    messages: list[str] = []
    meta = _prepare(root, tmp_path / "d", messages)
    kept = _docs(tmp_path / "d", "train") + _docs(tmp_path / "d", "val")
    assert "a document whose file name is Latin-1\n" in kept and meta["skipped"] == {}
    names = [d.name for d in iter_documents(str(root))]
    assert "caf\\xe9.txt" in names  # printable, stable, and writable to JSON


def test_a_json_integer_too_long_for_int_does_not_stop_prepare(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    big = "9" * 5000  # int() refuses more than 4,300 digits
    (root / "big.jsonl").write_text(f'{{"text": "record with a big id", "id": {big}}}\n[{big}]\n')
    meta = _prepare(root, tmp_path / "d")
    assert "record with a big id" in _docs(tmp_path / "d", "train") + _docs(tmp_path / "d", "val")
    assert meta["skipped"] == {"no_text_field": 1}  # the bare number is a record without text


def test_json_nested_too_deep_is_counted_apart_from_broken_json(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n{broken\n")
    meta = _prepare(root, tmp_path / "d")
    assert "fine" in _docs(tmp_path / "d", "train") + _docs(tmp_path / "d", "val")
    assert meta["skipped"] == {"json_too_deep": 2, "bad_json": 1}
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["sources"][0]["skipped_examples"]["json_too_deep"] == ["deep.json", "deep.jsonl#2"]


def test_a_lone_surrogate_in_json_text_becomes_a_replacement_character(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    (root / "lone.jsonl").write_text('{"text": "half a pair \\ud800 here"}\n')
    meta = _prepare(root, tmp_path / "d")
    # Replaced, not dropped: one bad escape should not cost the whole document.
    assert "half a pair \ufffd here" in _docs(tmp_path / "d", "train") + _docs(tmp_path / "d", "val")
    assert meta["skipped"] == {}


@pytest.mark.timeout(60)  # before the fix, opening the FIFO waited for a writer forever
def test_a_fifo_is_counted_never_opened(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    os.mkfifo(root / "pipe.txt")
    meta = _prepare(root, tmp_path / "d")
    assert meta["skipped"] == {"not_a_regular_file": 1}
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["sources"][0]["skipped_examples"]["not_a_regular_file"] == ["pipe.txt"]
    # Named directly, it is one clear line, not a hang.
    with pytest.raises(DataError, match="not a regular file") as info:
        iter_documents(str(root / "pipe.txt"))
    assert "\n" not in str(info.value)


def test_a_link_to_a_device_is_counted_and_a_link_to_a_file_followed(tmp_path: Path, monkeypatch) -> None:
    # A small cap: should the device ever be read, the test fails on too_large instead of
    # filling the memory with zeros.
    monkeypatch.setattr(safe_read, "MAX_DOCUMENT_BYTES", 2**20)
    root = _corpus(tmp_path / "c")
    (root / "zero.txt").symlink_to("/dev/zero")
    (root / "link.txt").symlink_to(root / "good0.txt")
    texts, skipped = _read(root)
    assert sorted(texts) == sorted([*GOOD, GOOD[0]]) and skipped == {"not_a_regular_file": 1}
    assert skipped.examples["not_a_regular_file"] == ["zero.txt"]


def test_symlinked_folders_are_counted_not_followed(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    (root / "loop").symlink_to(root)  # followed, this would never end
    texts, skipped = _read(root)
    assert sorted(texts) == GOOD and skipped == {"not_a_regular_file": 1}
    assert skipped.examples["not_a_regular_file"] == ["loop"]


def test_empty_archives_and_files_with_no_records_are_counted(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    (root / "zero_bytes.jsonl.gz").write_bytes(b"")
    (root / "empty_gzip.jsonl.gz").write_bytes(gzip.compress(b""))
    (root / "blank.jsonl").write_text("\n\n")
    (root / "none.json").write_text("[]")
    (root / "header.csv").write_text("id,text\n")
    texts, skipped = _read(root)
    assert sorted(texts) == GOOD and skipped == {"empty": 5}
    meta = _prepare(root, tmp_path / "d")
    assert meta["skipped"] == {"empty": 5}


def test_an_unreadable_folder_is_counted(tmp_path: Path, monkeypatch) -> None:
    root = _corpus(tmp_path / "c")
    (root / "locked").mkdir()
    (root / "locked" / "secret.txt").write_text("never seen\n")
    # Tests run as root, whom chmod does not stop: make listing the folder fail as it would
    # for another user.
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    texts, skipped = _read(root)
    assert sorted(texts) == GOOD and skipped == {"unreadable": 1}
    assert skipped.examples["unreadable"] == ["locked"]


def test_oversized_documents_are_counted_and_reading_stays_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(safe_read, "MAX_DOCUMENT_BYTES", 1000)
    monkeypatch.setattr(safe_read, "MAX_JSON_FILE_BYTES", 5000)
    root = _corpus(tmp_path / "c")
    (root / "big.txt").write_text("x" * 1001)
    (root / "fits.txt").write_text("y" * 1000)
    # An over-long line is skipped, and the line after it still read.
    (root / "lines.jsonl").write_text(json.dumps({"text": "z" * 2000}) + '\n{"text": "after"}\n')
    # A line over the cap is left out; a quoted field over it, in short lines, ends the file.
    field = '"' + ("v" * 500 + "\n") * 5 + '"\n'
    (root / "rows.csv").write_text("text\n" + "w" * 3000 + "\nrow after\n" + field + "never read\n")
    (root / "whole.json").write_text(json.dumps([{"text": "j"}] * 1000))  # 14 kB > 5 kB
    (root / "field.json").write_text(json.dumps({"text": "\u00e9" * 600}))  # 1,200 UTF-8 bytes
    texts, skipped = _read(root)
    assert sorted(texts) == sorted([*GOOD, "y" * 1000, "after", "row after"])
    assert skipped == {"too_large": 6}
    assert skipped.examples["too_large"] == ["big.txt", "field.json", "lines.jsonl#1"]


def test_a_folder_tree_a_thousand_levels_deep(tmp_path: Path) -> None:
    root = _corpus(tmp_path / "c")
    # Built and removed with relative paths: the full path is longer than some tools accept.
    here = os.getcwd()
    os.chdir(root)
    try:
        for _ in range(1100):
            os.mkdir("d")
            os.chdir("d")
        Path("deep.txt").write_text("found at the bottom\n")
        os.chdir(root)
        texts, skipped = _read(root)
    finally:
        os.chdir(root)
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for _ in range(depth):
            for name in os.listdir("."):
                os.remove(name)
            os.chdir("..")
            os.rmdir("d")
        os.chdir(here)
    assert sorted(texts) == sorted([*GOOD, "found at the bottom\n"]) and skipped == {}


def test_stdlib_leaves_out_data_tables_and_counts_them() -> None:
    skipped = Skips()
    names = [d.name for d in iter_documents("builtin:stdlib", skipped=skipped)]
    assert "json/decoder.py" in names and "os.py" in names
    assert "encodings/cp1252.py" not in names and "html/entities.py" not in names
    root = stdlib_corpus.stdlib_root()
    assert stdlib_corpus.mostly_data((root / "encodings" / "cp1252.py").read_text(encoding="utf-8"))
    # The rule must not call code data (a rule that drops everything would pass the lines above).
    code = ("json/decoder.py", "os.py", "collections/__init__.py", "encodings/utf_8.py")
    assert not any(stdlib_corpus.mostly_data((root / n).read_text(encoding="utf-8")) for n in code)
    assert skipped["mostly_data"] >= 50 and len(names) > 300
    # empty package __init__ files are left out as such, and are not a problem worth a warning
    assert skipped.get("empty_module", 0) >= 1 and "empty" not in skipped
    again = [d.name for d in iter_documents("builtin:stdlib", max_docs=100)]
    assert again == names[:100]  # still deterministic


def test_mostly_data_rule_on_small_examples() -> None:
    table = "decoding_table = (\n" + "".join(f"    '\\x{i:02x}'  # 0x{i:02X}\n" for i in range(40)) + ")\n"
    mapping = "MAP = {\n" + "".join(f"    0x{i:04x}: 0x{i:04x},\n" for i in range(40)) + "}\n"
    code = "def f(x):\n    '''Doc.'''\n    return [x, 1, 'a']\n" * 20
    assert stdlib_corpus.mostly_data(table) and stdlib_corpus.mostly_data(mapping)
    assert not stdlib_corpus.mostly_data(code) and not stdlib_corpus.mostly_data("")


def test_prepare_reports_what_builtin_stdlib_left_out(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "lib"
    fake.mkdir()
    for i, text in enumerate(GOOD):
        (fake / f"mod{i}.py").write_text(f"def f{i}():\n    return {text!r}\n")
    (fake / "os.py").write_text("import sys\n\ndef getcwd():\n    return sys.path[0]\n")
    (fake / "table.py").write_text("T = [\n" + "    0x1, 0x2, 0x3,\n" * 30 + "]\n")
    monkeypatch.setattr(stdlib_corpus, "stdlib_root", lambda: fake)
    messages: list[str] = []
    meta = prepare(
        ["builtin:stdlib"], tmp_path / "d", vocab_size=300, val_fraction=0.3, progress=messages.append
    )
    assert meta["skipped"] == {"mostly_data": 1}
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["sources"][0]["skipped_examples"] == {"mostly_data": ["table.py"]}
    assert any("left out 1 modules that are mostly data tables" in m for m in messages)
    assert not any(m.startswith("warning") for m in messages)  # by design, not a problem
