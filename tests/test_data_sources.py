"""Every source kind, offline: file formats, Hugging Face streaming (local mirror), Kaggle, mixtures."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data import DataError
from lmforge.data.hub import MIRROR_ENV, SHORTCUTS, parse_hf
from lmforge.data.mixture import mix, parse_source, parse_sources
from lmforge.data.sources import Document, Skips, iter_documents


def _jsonl(path: Path, records: list[dict], gz: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def _parquet(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_every_file_format_and_text_field(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("plain text")
    (root / "b.md").write_text("# markdown")
    (root / "c.json").write_text(json.dumps([{"text": "j0"}, {"content": "j1"}]))
    _jsonl(root / "d.jsonl", [{"text": "l1"}, {"text": "l2"}])
    _jsonl(root / "e.jsonl.gz", [{"text": "gz1"}, {"content": "gz2"}], gz=True)
    _parquet(root / "f.parquet", {"text": ["p0", None, "p2"], "id": [0, 1, 2]})
    _csv(root / "g.csv", [{"id": "1", "text": "c1, with a comma\nand a newline"}, {"id": "2", "text": "c2"}])
    docs = list(iter_documents(str(root)))
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "plain text"),
        ("b.md", "# markdown"),
        ("c.json#0", "j0"),
        ("c.json#1", "j1"),
        ("d.jsonl#1", "l1"),
        ("d.jsonl#2", "l2"),
        ("e.jsonl.gz#1", "gz1"),
        ("e.jsonl.gz#2", "gz2"),
        ("f.parquet#0", "p0"),
        ("f.parquet#2", "p2"),
        ("g.csv#1", "c1, with a comma\nand a newline"),
        ("g.csv#2", "c2"),
    ]
    # --text-field picks another field in every record format, with no fallback to 'text'.
    other = tmp_path / "other"
    other.mkdir()
    _jsonl(other / "a.jsonl", [{"body": "B1", "text": "no"}, {"text": "only text"}])
    _parquet(other / "b.parquet", {"body": ["B2"]})
    _csv(other / "c.csv", [{"body": "B3"}])
    skipped = Skips()
    got = [d.text for d in iter_documents(str(other), skipped=skipped, text_field="body")]
    assert got == ["B1", "B2", "B3"] and skipped == {"no_text_field": 1}
    assert skipped.examples == {"no_text_field": ["a.jsonl#2"]}


def _repo(mirror: Path, repo: str, config: str | None, files: dict[str, list[dict]]) -> None:
    """A local copy of a hub dataset repository: data files plus README configs, as on the hub."""
    root = mirror / repo
    for rel, records in files.items():
        if rel.endswith(".parquet"):
            _parquet(root / rel, {k: [r.get(k) for r in records] for k in records[0]})
        else:
            _jsonl(root / rel, records)
    if config is not None:
        pattern = str(Path(next(iter(files))).parent / "*")
        (root / "README.md").write_text(
            f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: train\n    path: {pattern}\n---\n"
        )


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch) -> Path:
    mirror = tmp_path / "mirror"
    web = [{"text": f"web page {i}", "url": f"u{i}"} for i in range(6)]
    _repo(mirror, "HuggingFaceFW/fineweb", "sample-10BT", {"sample/10BT/000.parquet": web})
    _repo(mirror, "allenai/c4", "en", {"en/c4-train.00000.json": [{"text": f"c4 doc {i}"} for i in range(4)]})
    _repo(mirror, "monology/pile-uncopyrighted", None, {"train/00.jsonl": [{"text": "pile doc", "meta": {}}]})
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    return mirror


def test_hf_shortcuts_stream_through_datasets(mirror: Path, monkeypatch) -> None:
    import datasets

    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    fineweb = [d.text for d in iter_documents("fineweb")]
    assert fineweb == [f"web page {i}" for i in range(6)]
    assert calls[0][0][1] == "sample-10BT" and calls[0][1] == {"split": "train", "streaming": True}
    assert [
        d.text for d in iter_documents("hf:HuggingFaceFW/fineweb:sample-10BT@train", max_docs=2)
    ] == fineweb[:2]
    assert [d.text for d in iter_documents("c4")] == [f"c4 doc {i}" for i in range(4)]
    assert [d.text for d in iter_documents("pile")] == ["pile doc"]
    # Document names are stable and say where they came from (they decide the val split).
    assert next(iter_documents("fineweb")).name == "hf:HuggingFaceFW/fineweb:sample-10BT@train#0"
    assert parse_hf("hf:org/name:cfg@validation") == parse_hf("hf:org/name:cfg@validation")
    assert parse_hf("hf:org/name@test").split == "test" and parse_hf("hf:org/name").config is None
    assert SHORTCUTS["fineweb-edu"].repo == "HuggingFaceFW/fineweb-edu"


def test_dolma_falls_back_to_c4_with_a_warning(mirror: Path) -> None:
    messages: list[str] = []
    docs = [d.text for d in iter_documents("dolma", log=messages.append)]  # no dolma in the mirror
    assert docs == [f"c4 doc {i}" for i in range(4)]
    assert len(messages) == 1 and "falling back to c4" in messages[0] and "allenai/dolma" not in docs
    # Negative control: a dataset without a fallback is one clear error, not a silent switch.
    with pytest.raises(DataError, match="cannot stream 'hf:nobody/nothing'"):
        iter_documents("hf:nobody/nothing")


def test_kaggle_without_credentials_says_how_to_create_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    with pytest.raises(DataError, match=r"~/.kaggle/kaggle.json") as info:
        iter_documents("kaggle:someone/news")
    assert "\n" not in str(info.value) and "Create New Token" in str(info.value)
    with pytest.raises(DataError, match="OWNER/DATASET"):
        iter_documents("kaggle:just-a-name")


def test_kaggle_reads_a_finished_download_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "kaggle" / "someone" / "news"
    _csv(folder / "articles.csv", [{"title": "t", "content": "kaggle article"}])
    # Without the completion marker the folder is an interrupted download and is not trusted.
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    with pytest.raises(DataError, match="kaggle.json"):
        iter_documents("kaggle:someone/news")
    (folder / ".complete").touch()
    docs = list(iter_documents("kaggle:someone/news"))
    assert [(d.name, d.text) for d in docs] == [("kaggle:someone/news/articles.csv#1", "kaggle article")]


def test_parse_source_weights(tmp_path: Path) -> None:
    assert parse_source("data/web:0.7").weight == 0.7 and parse_source("data/web:0.7").source == "data/web"
    assert parse_source("hf:allenai/c4:en").weight is None  # a config, not a weight
    assert parse_source("hf:allenai/c4:en:3").source == "hf:allenai/c4:en"
    odd = tmp_path / "notes:2"
    odd.mkdir()
    assert parse_source(str(odd)).weight is None  # an existing path wins
    with pytest.raises(DataError, match="every --source"):
        parse_sources(["a:1", "b"])
    with pytest.raises(DataError, match="> 0"):
        parse_source("a:0")


def test_mix_follows_the_weights_by_bytes() -> None:
    def stream(tag: str, size: int):
        return (Document(f"{tag}{i}", tag * (size + i % 5)) for i in range(10_000))

    pairs = list(mix([stream("a", 50), stream("b", 200), stream("c", 10)], [5, 3, 2]))
    taken = [0, 0, 0]
    for index, doc in pairs:
        taken[index] += len(doc.text)
    shares = [t / sum(taken) for t in taken]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.02)
    assert pairs[:3] == list(mix([stream("a", 50), stream("b", 200), stream("c", 10)], [5, 3, 2]))[:3]
    # Without weights the sources are read one after another.
    plain = [i for i, _ in mix([iter([Document("x", "1")]), iter([Document("y", "2")])], None)]
    assert plain == [0, 1]


def test_stream_failing_midway_is_one_clear_error(tmp_path: Path) -> None:
    repo = tmp_path / "org" / "broken"
    _parquet(repo / "data" / "a.parquet", {"text": ["first", "second"]})
    (repo / "data" / "b.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    stream = iter_documents(f"hf:{repo}")
    assert [next(stream).text, next(stream).text] == ["first", "second"]
    with pytest.raises(DataError, match=r"streaming 'hf:.*broken' failed after 2 records") as info:
        next(stream)
    assert "\n" not in str(info.value)
