"""Remote sources: Hugging Face datasets streamed with `datasets`, and Kaggle datasets.

``hf:NAME[:CONFIG][@SPLIT]`` streams records (nothing is downloaded in full first), and a
few named shortcuts carry the right repository, config and text field. ``kaggle:OWNER/DATASET``
downloads once through the official ``kaggle`` package into a cache folder, then reads it
like any local folder.

``LMFORGE_HF_MIRROR`` may name a folder that holds copies of hub dataset repositories
(``MIRROR/OWNER/NAME/...``, the same layout and README configs as on the hub). A repository
found there is streamed from disk through the very same ``load_dataset(..., streaming=True)``
call: this is how air-gapped clusters use the shortcuts, and how the tests run offline.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.errors import DataError
from lmforge.data.files import Document, Log, RecordFormat, iter_folder

HF_PREFIX = "hf:"
KAGGLE_PREFIX = "kaggle:"
MIRROR_ENV = "LMFORGE_HF_MIRROR"
CACHE_ENV = "LMFORGE_CACHE"
_COMPLETE = ".complete"


@dataclass(frozen=True)
class HubDataset:
    """Where a hub dataset lives and which field holds its text."""

    repo: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    fallback: str | None = None  # shortcut used when this one cannot be loaded


# Each entry names the repository, config and text field on the Hugging Face hub.
SHORTCUTS: dict[str, HubDataset] = {
    # FineWeb's 10B-token sample (Penedo et al., 2024); the full set is 15T tokens.
    "fineweb": HubDataset("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": HubDataset("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    # Dolma (Soldaini et al., 2024) needs a loading script that recent `datasets` refuse to
    # run, so it often cannot be loaded; users asked for C4 in that case.
    "dolma": HubDataset("allenai/dolma", fallback="c4"),
    # The original EleutherAI/pile is no longer hosted; this is the Pile with the
    # copyrighted subsets (Books3, BookCorpus2, OpenSubtitles, YTSubtitles, OWT2) removed.
    "pile": HubDataset("monology/pile-uncopyrighted"),
    "c4": HubDataset("allenai/c4", "en"),
}


def is_hub_source(source: str) -> bool:
    """True for hf:..., kaggle:... and the named shortcuts."""
    return source.startswith((HF_PREFIX, KAGGLE_PREFIX)) or source in SHORTCUTS


def parse_hf(source: str) -> HubDataset:
    """``hf:NAME[:CONFIG][@SPLIT]`` or a shortcut name -> HubDataset."""
    if source in SHORTCUTS:
        return SHORTCUTS[source]
    spec = source[len(HF_PREFIX) :]
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, _, config = spec.partition(":")
    if name in SHORTCUTS and not config and "/" not in name:
        base = SHORTCUTS[name]
        return HubDataset(base.repo, base.config, split, base.text_field, base.fallback)
    if not name or not split:
        raise DataError(f"source '{source}' is not hf:NAME[:CONFIG][@SPLIT], e.g. hf:allenai/c4:en@train")
    return HubDataset(name, config or None, split)


def _location(repo: str) -> str:
    """The local mirror copy of ``repo`` when there is one, else the hub repository id."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and (Path(mirror).expanduser() / repo).is_dir():
        return str(Path(mirror).expanduser() / repo)
    return repo


def _stream(ds: HubDataset) -> Iterator[dict]:
    """Records of ``ds`` streamed by `datasets`; raises whatever `datasets` raises."""
    try:
        import datasets
    except ImportError:
        raise DataError("hub sources need the `datasets` package: pip install 'lmforge[hf]'") from None
    stream = datasets.load_dataset(_location(ds.repo), ds.config, split=ds.split, streaming=True)
    return iter(stream)


def _open_with_fallback(
    source: str, ds: HubDataset, log: Log
) -> tuple[HubDataset, Iterator[dict], dict | None]:
    """Start streaming ``ds`` and fetch its first record, falling back if the dataset says so."""
    try:
        records = _stream(ds)
        return ds, records, next(records, None)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for "cannot load"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if ds.fallback is None:
            raise DataError(
                f"cannot stream '{source}' ({reason}): check the name, config and split, and your "
                "network or HF_TOKEN; offline, set LMFORGE_HF_MIRROR to a folder of local copies"
            ) from None
        fallback = SHORTCUTS[ds.fallback]
        log(
            f"warning: '{source}' could not be loaded ({reason}); falling back to {ds.fallback} ({fallback.repo})"
        )
        return _open_with_fallback(ds.fallback, fallback, log)


def iter_hf(source: str, skipped: dict[str, int] | None, fmt: RecordFormat, log: Log) -> Iterator[Document]:
    """Documents streamed from a Hugging Face dataset, one per record."""
    ds, records, first = _open_with_fallback(source, parse_hf(source), log)
    # --text-field wins; otherwise the dataset's own field, then the usual text/content.
    fmt = fmt.for_dataset(ds.text_field)
    prefix = f"hf:{ds.repo}:{ds.config or ''}@{ds.split}"
    index = 0
    record = first
    while record is not None:
        doc = fmt.document(f"{prefix}#{index}", record, skipped)
        if doc is not None:
            yield doc
        index += 1
        try:
            record = next(records, None)
        except Exception as exc:  # a dropped connection or a corrupt remote file mid-stream
            raise DataError(
                f"streaming '{source}' failed after {index:,} records ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): run prepare again"
            ) from None


def _kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", "~/.kaggle")).expanduser()
    return (config_dir / "kaggle.json").is_file()


def cache_root() -> Path:
    """Where downloaded datasets are kept ($LMFORGE_CACHE, else ~/.cache/lmforge)."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/lmforge")).expanduser()


def kaggle_folder(dataset: str) -> Path:
    """The local folder holding Kaggle ``OWNER/DATASET``, downloaded on first use."""
    owner, _, name = dataset.partition("/")
    if not owner or not name or "/" in name:
        raise DataError(
            f"kaggle source '{dataset}' must be kaggle:OWNER/DATASET, e.g. kaggle:user/news-articles"
        )
    folder = cache_root() / "kaggle" / owner / name
    if (folder / _COMPLETE).is_file():
        return folder
    if not _kaggle_credentials():
        raise DataError(
            "kaggle sources need an API token: on kaggle.com open Settings -> API -> Create New Token "
            "and save the downloaded kaggle.json as ~/.kaggle/kaggle.json (chmod 600)"
        )
    try:
        # Imported only now: the package authenticates at import time.
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise DataError("kaggle sources need the `kaggle` package: pip install 'lmforge[kaggle]'") from None
    tmp = folder.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(dataset, path=str(tmp), unzip=True, quiet=False)
        (tmp / _COMPLETE).touch()
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot download kaggle:{dataset} ({type(exc).__name__}: {exc})") from None
    return folder


def iter_hub_source(
    source: str, skipped: dict[str, int] | None, fmt: RecordFormat, log: Log
) -> Iterator[Document]:
    """Documents of an hf:, kaggle: or shortcut source."""
    if source.startswith(KAGGLE_PREFIX):
        dataset = source[len(KAGGLE_PREFIX) :]
        folder = kaggle_folder(dataset)
        yield from iter_folder(folder, skipped, fmt, prefix=f"{source}/")
        return
    yield from iter_hf(source, skipped, fmt, log)
