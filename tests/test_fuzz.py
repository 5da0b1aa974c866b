"""Seeded property tests: prepare's readers and the config loader on random and hostile input.

Derandomized (the same examples on every run) and small, so the whole file takes seconds: each
test checks that nothing crashes with anything but the documented error, and that every record
either becomes a document or is counted as a skip with a reason.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import Config, ConfigError
from lmforge.config_io import config_from_dict, load_yaml_config
from lmforge.data.sources import Skips, iter_documents

# Derandomized: a failure is the same failure on every machine and every run. The deadline
# catches a hang or a quadratic blow-up on these small inputs; the first example of a test
# also pays for imports, hence the generous figure.
FUZZ = settings(derandomize=True, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    """FUZZ with its own number of examples, sized so the whole file stays within seconds."""
    return settings(FUZZ, max_examples=examples)


FORMATS = (".txt", ".md", ".json", ".jsonl", ".jsonl.gz", ".csv", ".parquet")

# Text that reaches the readers: any code point, with lone surrogates made common.
any_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=40)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["text", "content", "id", "meta"]), inner, max_size=3),
    ),
    max_leaves=8,
)
# What hand-made hostile files hold: huge numbers, deep nesting, lone surrogates, raw bytes.
hostile_lines = st.sampled_from(
    [
        b'{"text": "big id", "id": ' + b"7" * 5000 + b"}",
        b"[" * 5000 + b"]" * 5000,
        b"[" * 5000,
        b'{"text": "lone \\udc80 surrogate"}',
        b'{"text": "caf\xe9 in latin-1"}',
        b'{"text": "nul \x00 byte"}',
        b'{"text": 1e999}',
        b"NaN",
        b"\xef\xbb\xbf{}",
    ]
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Callable[[], Path]:
    """A fresh folder per example: tmp_path would be one folder shared by all of a test's examples."""
    root = tmp_path_factory.mktemp("fuzz")
    return lambda: Path(tempfile.mkdtemp(dir=root))


def _read(path: Path) -> tuple[list[str], Skips]:
    skipped = Skips()
    texts = [doc.text for doc in iter_documents(str(path), skipped=skipped)]
    for text in texts:  # every document can be hashed and tokenized: valid UTF-8, not blank
        assert text.strip() and text.encode("utf-8")
    assert all(reason and count > 0 for reason, count in skipped.items())
    return texts, skipped


@fuzz(400)
@given(data=st.binary(max_size=600), suffix=st.sampled_from(FORMATS), gz=st.booleans())
def test_any_bytes_in_any_format_give_documents_or_counted_skips(
    scratch, data: bytes, suffix: str, gz: bool
) -> None:
    path = scratch() / f"input{suffix}"
    path.write_bytes(gzip.compress(data) if gz and suffix == ".jsonl.gz" else data)
    texts, skipped = _read(path)
    assert len(texts) + sum(skipped.values()) >= 1  # a file never disappears without a trace


def _line(value) -> bytes:
    return json.dumps(value).encode("ascii")  # ensure_ascii: surrogates become \udXXX escapes


@fuzz(300)
@given(
    records=st.lists(st.one_of(json_values.map(_line), hostile_lines), max_size=6),
    blanks=st.integers(0, 2),
    gz=st.booleans(),
)
def test_every_jsonl_record_is_a_document_or_one_counted_skip(
    scratch, records: list[bytes], blanks: int, gz: bool
) -> None:
    data = b"\n".join([b""] * blanks + records) + b"\n"
    path = scratch() / ("records.jsonl.gz" if gz else "records.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    texts, skipped = _read(path)
    # One per record; a file with no records at all counts once, as empty.
    assert len(texts) + sum(skipped.values()) == (len(records) or 1)
    assert "unreadable" not in skipped


@fuzz(200)
@given(records=st.lists(json_values, max_size=6), as_list=st.booleans())
def test_every_json_record_is_a_document_or_one_counted_skip(scratch, records: list, as_list: bool) -> None:
    path = scratch() / "records.json"
    payload = records if as_list else (records[0] if records else {})
    path.write_text(json.dumps(payload), encoding="ascii")
    texts, skipped = _read(path)
    # A top-level list is a list of records; anything else is one record.
    expected = (len(payload) or 1) if isinstance(payload, list) else 1
    assert len(texts) + sum(skipped.values()) == expected


# csv and parquet hold text only as valid UTF-8: no surrogates, and csv's NUL is not text.
csv_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)


@fuzz(200)
@given(rows=st.lists(csv_text, min_size=1, max_size=6))
def test_every_csv_row_is_a_document_or_one_counted_skip(scratch, rows: list[str]) -> None:
    path = scratch() / "rows.csv"
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["id", "text"])
    writer.writerows([i, text] for i, text in enumerate(rows))
    path.write_bytes(buffer.getvalue().encode("utf-8"))
    texts, skipped = _read(path)
    assert len(texts) + sum(skipped.values()) == len(rows)
    assert sorted(texts) == sorted(t for t in rows if t.strip())  # csv round-trips exactly


@fuzz(60)
@given(rows=st.lists(st.one_of(st.none(), csv_text), max_size=5), column=st.sampled_from(["text", "body"]))
def test_every_parquet_row_is_a_document_or_one_counted_skip(scratch, rows: list, column: str) -> None:
    path = scratch() / "rows.parquet"
    pq.write_table(pa.table({column: pa.array(rows, type=pa.string())}), path)
    texts, skipped = _read(path)
    assert len(texts) + sum(skipped.values()) == (len(rows) or 1)


# ---------------------------------------------------------------------------- config

SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
KEYS = {
    name: [g.name for g in dataclasses.fields(f.default_factory())]
    for name, f in SECTIONS.items()
    if f.default_factory is not dataclasses.MISSING
}
# Values of every YAML type, and the words the Literal settings accept.
config_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["auto", "cpu", "bf16", "fsdp", "every_k", "adamw", "rope", "llama", "gpt-tiny"]),
    st.sampled_from([1, 2, 4, 8, 32, 64, 0.5, 1e-4]),
)
section = st.dictionaries(
    st.one_of(st.sampled_from(sorted({k for keys in KEYS.values() for k in keys})), st.text(max_size=6)),
    config_values,
    max_size=4,
)
config_dicts = st.dictionaries(
    st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=6), st.integers()),
    st.one_of(section, config_values),
    max_size=4,
)


def _loads_or_config_error(load) -> None:
    try:
        cfg = load()
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message, repr(message)
        return
    assert isinstance(cfg, Config)


@fuzz(600)
@given(d=config_dicts)
def test_config_from_dict_gives_a_config_or_one_line_config_error(d: dict) -> None:
    _loads_or_config_error(lambda: config_from_dict(d))


@fuzz(300)
@given(
    text=st.one_of(config_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=60)),
    latin1=st.booleans(),
)
def test_load_yaml_config_gives_a_config_or_one_line_config_error(scratch, text: str, latin1: bool) -> None:
    path = scratch() / "config.yaml"
    path.write_bytes(text.encode("latin-1", errors="replace") if latin1 else text.encode("utf-8", "replace"))
    _loads_or_config_error(lambda: load_yaml_config(path))


@pytest.mark.parametrize(
    "text",
    [
        "- a\n- b\n",  # a list, not a mapping
        "just a string\n",
        "train: 5\n",
        "train: [lr]\n",
        "model: {n_layer: " + "9" * 5000 + "}\n",  # int() refuses this many digits
        "model: " + "[" * 1200 + "\n",  # deeper than the parser recurses (slow: once, not fuzzed)
        "train: !!python/object:os.system {}\n",  # safe_load refuses the tag
        "a: &x [*x]\n",
        "model: {n_layer: 2\n",
        "\t: :\n",
    ],
)
def test_load_yaml_config_on_hostile_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml_config(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("good", [{}, {"model": {"n_layer": 2}, "train": {"lr": 0.001}}])
def test_config_loaders_accept_valid_configs(tmp_path: Path, good: dict) -> None:
    # Negative control for the two tests above: a loader that always raised ConfigError
    # would pass them.
    assert isinstance(config_from_dict(good), Config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(good))
    assert load_yaml_config(path).train.lr == good.get("train", {}).get("lr", Config().train.lr)


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"train": {"lr": "fast"}}, "train.lr='fast': must be float"),
        ({"model": {"n_layer": True}}, "model.n_layer=True: must be int"),
        ({"model": {"n_kv_head": 2.5}}, "model.n_kv_head=2.5: must be int or null"),
        ({"train": {"micro_batch_size": "big"}}, "train.micro_batch_size='big': must be int or 'auto'"),
        ({"eval": 3}, "eval=3: must be a mapping"),
        ({7: {}}, "unknown config key 7"),
        ({"model": {"n_head": 3, "n_embd": 32}}, "model.n_embd=32 is not divisible by model.n_head=3"),
    ],
)
def test_config_errors_name_the_key_and_the_value(d: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(d)
    assert str(info.value).startswith(message)
