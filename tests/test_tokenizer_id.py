"""A tokenizer's identity is what it does: tokenizer_id, and the resume check that compares by it."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, normalizers, processors

from lmforge.config import Config, ConfigError
from lmforge.config_io import config_to_dict
from lmforge.data import Tokenizer, train_tokenizer
from lmforge.data.tokenizer import EOS_TOKEN, file_sha256, tokenizer_id
from lmforge.model.config import ModelConfig
from lmforge.train.resume import check_resume_compatible

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "dog",
    "ran",
    "to",
    "park",
    "birds",
    "sang",
    "in",
    "green",
    "trees",
]
SAMPLES = ["the cat sat on the mat", "  birds  sang\nin trees ", "green PARK <|endoftext|> dog"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained byte-level BPE tokenizer.json (no post-processor, as lmforge prepare writes it)."""
    rng = random.Random(0)
    tok = train_tokenizer([" ".join(rng.choices(WORDS, k=200)) for _ in range(20)], vocab_size=300)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def variant(base, tmp_path, name, edit):
    """A copy of `base` changed by `edit`: ("hf", f) edits the tokenizers object, ("json", f) its JSON."""
    kind, fn = edit
    hf = HFTokenizer.from_file(str(base))
    text = fn(hf).to_str(pretty=True) if kind == "hf" else json.dumps(fn(json.loads(hf.to_str())), indent=1)
    path = tmp_path / f"{name}.json"
    path.write_text(text, encoding="utf-8")
    return path


def behaviour(path):
    tok = HFTokenizer.from_file(str(path))
    ids = [tok.encode(s, add_special_tokens=special).ids for s in SAMPLES for special in (False, True)]
    return ids, [tok.decode(i, skip_special_tokens=False) for i in ids]


def _set(hf, attr, value):
    setattr(hf, attr, value)
    return hf


SAME = {
    # what transformers' save_pretrained writes into the copy an HF export holds
    "noop_template": (
        "hf",
        lambda hf: _set(
            hf,
            "post_processor",
            processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[]),
        ),
    ),
    "byte_level_post": ("hf", lambda hf: _set(hf, "post_processor", processors.ByteLevel(trim_offsets=True))),
    # how tokenizers before 0.20 wrote BPE merges
    "merges_as_strings": (
        "json",
        lambda tree: {
            **tree,
            "model": {**tree["model"], "merges": [" ".join(m) for m in tree["model"]["merges"]]},
        },
    ),
    "key_order": ("json", lambda tree: dict(reversed(list(tree.items())))),
}


def _eos(tree):
    return next(t["id"] for t in tree["added_tokens"] if t["content"] == EOS_TOKEN)


def _adds_bos(tree):
    bos = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A $B", special_tokens=[(EOS_TOKEN, _eos(tree))]
    )
    return {**tree, "post_processor": json.loads(bos.__getstate__())}


DIFFERENT = {
    "merge_dropped": (
        "json",
        lambda tree: {**tree, "model": {**tree["model"], "merges": tree["model"]["merges"][:-1]}},
    ),
    "lowercase": ("hf", lambda hf: _set(hf, "normalizer", normalizers.Lowercase())),
    "decoder": ("hf", lambda hf: _set(hf, "decoder", decoders.Metaspace())),
    "adds_bos": ("json", _adds_bos),  # lmforge encodes without it, an HF export's users get it by default
    "special_token": ("hf", lambda hf: hf.add_special_tokens(["dog"]) and hf),
}


@pytest.mark.parametrize("name", list(SAME))
def test_tokenizer_id_is_equal_for_copies_that_encode_and_decode_alike(base, tmp_path, name):
    copy = variant(base, tmp_path, name, SAME[name])
    assert behaviour(copy) == behaviour(base)
    assert tokenizer_id(copy) == tokenizer_id(base) == tokenizer_id(Tokenizer.load(copy))
    if name in ("noop_template", "byte_level_post", "merges_as_strings"):
        assert file_sha256(copy) != file_sha256(base)  # the old file digest told them apart


@pytest.mark.parametrize("name", list(DIFFERENT))
def test_tokenizer_id_changes_with_ids_or_text(base, tmp_path, name):
    other = variant(base, tmp_path, name, DIFFERENT[name])
    assert behaviour(other) != behaviour(base)  # the variant really does something else
    assert tokenizer_id(other) != tokenizer_id(base)


# --- the resume check ----------------------------------------------------------------------------


def resume_case(base, tmp_path, run_tok, data_tok, saved_keys, data_keys):
    """(saved meta, cfg, data meta) with the given tokenizer files in the run and data folders and only the
    given digest keys recorded (old metas have tokenizer_sha256 alone)."""
    run, data = tmp_path / "run", tmp_path / "data"
    for folder, tok in ((run, run_tok), (data, data_tok)):
        folder.mkdir(exist_ok=True)
        if tok is not None:
            (folder / "tokenizer.json").write_bytes(tok.read_bytes())
    cfg = Config(model=ModelConfig(vocab_size=300), data=str(data), out=str(run))

    def digests(tok, keys):
        known = {"tokenizer_sha256": file_sha256(tok), "tokenizer_id": tokenizer_id(tok)}
        return {k: known[k] for k in keys}

    saved = {"config": config_to_dict(cfg), "loader": {}, **digests(run_tok or base, saved_keys)}
    return saved, cfg, digests(data_tok, data_keys)


BOTH, OLD = ("tokenizer_sha256", "tokenizer_id"), ("tokenizer_sha256",)


@pytest.mark.parametrize(
    "saved_keys, data_keys",
    [(BOTH, BOTH), (OLD, BOTH), (BOTH, OLD), (OLD, OLD)],
    ids=["new-new", "old-checkpoint", "old-data", "old-old"],
)
def test_resume_accepts_the_same_tokenizer_resaved_and_refuses_another(base, tmp_path, saved_keys, data_keys):
    resaved = variant(base, tmp_path, "resaved", SAME["noop_template"])
    saved, cfg, data_meta = resume_case(base, tmp_path, base, resaved, saved_keys, data_keys)
    check_resume_compatible(saved, cfg, data_meta)  # same tokenizer, other bytes

    other = variant(base, tmp_path, "other", DIFFERENT["merge_dropped"])
    saved, cfg, data_meta = resume_case(base, tmp_path, base, other, saved_keys, data_keys)
    with pytest.raises(ConfigError, match="the data's tokenizer .* differs"):
        check_resume_compatible(saved, cfg, data_meta)


def test_resume_of_an_old_checkpoint_trusts_only_the_run_tokenizer_its_digest_names(base, tmp_path):
    resaved = variant(base, tmp_path, "resaved", SAME["noop_template"])
    lowercase = variant(base, tmp_path, "lowercase", DIFFERENT["lowercase"])
    # The run folder's tokenizer.json is not the one the checkpoint recorded (its digest differs), so the
    # check cannot learn what the checkpoint's tokenizer did and falls back to the file digests: refused.
    saved, cfg, data_meta = resume_case(base, tmp_path, lowercase, resaved, OLD, BOTH)
    saved["tokenizer_sha256"] = file_sha256(base)
    with pytest.raises(ConfigError, match="tokenizer_sha256"):
        check_resume_compatible(saved, cfg, data_meta)
    (tmp_path / "run" / "tokenizer.json").unlink()  # none at all: the same
    with pytest.raises(ConfigError, match="tokenizer_sha256"):
        check_resume_compatible(saved, cfg, data_meta)
