"""Tokenizer training, saving and loading on top of the Hugging Face `tokenizers` library."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from lmforge.data.errors import DataError
from lmforge.data.folder import TOKENIZER_FILE
from lmforge.data.tokenizer_kinds import EOS_TOKEN, MIN_BYTE_VOCAB, TRAINED_KINDS, byte_symbols, train_hf

TOKENIZER_KINDS = TRAINED_KINDS
MIN_VOCAB_SIZE = MIN_BYTE_VOCAB


def _canonical(tree: object) -> str:
    """A parsed JSON tree written canonically: sorted keys, no whitespace."""
    # Canonicalising through json makes the digest independent of the library's key order and
    # pretty-printing, so it survives save/load and library upgrades that only reformat the file.
    return json.dumps(
        tree,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        check_circular=False,  # a parsed JSON tree has no cycles; same output, 20% faster
    )


class Tokenizer:
    """A thin wrapper around ``tokenizers.Tokenizer`` with the few operations lmforge needs."""

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        self._tok = hf_tokenizer
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(
                f"tokenizer has no '{EOS_TOKEN}' token: train one with lmforge prepare, "
                "or add it as a special token"
            )
        self._eos_id = int(eos)
        # Treat a literal "<|endoftext|>" inside a document as plain text: document
        # boundaries must come only from prepare(), never from what a document happens to
        # contain. The flag is not stored in tokenizer.json, so it is set on every wrap.
        self._tok.encode_special_tokens = True

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token that separates documents."""
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts; the Rust side spreads the work over all cores."""
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which we
        # never use; it is about a third faster and needs less memory.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens are kept so decode(encode(s)) == s."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: a byte-level token's own bytes (which may be part of a
        character, where decode() gives U+FFFD), else the UTF-8 of its decoded text."""
        symbol = self._tok.id_to_token(int(token))
        table = _symbol_bytes()
        special = symbol is not None and self._tok.get_added_tokens_decoder().get(int(token)) is not None
        byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        if symbol is not None and not special and byte_level and all(ch in table for ch in symbol):
            return bytes(table[ch] for ch in symbol)
        return self.decode([token]).encode("utf-8")

    def to_json(self) -> str:
        """The tokenizer serialised as canonical JSON (sorted keys, no whitespace)."""
        return _canonical(json.loads(self._tok.to_str()))

    def sha256(self) -> str:
        """Hex sha256 of the canonical JSON; identical for a tokenizer and its saved copy."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a folder to put it in); return its path."""
        target = Path(path)
        if target.is_dir() or target.suffix != ".json":
            target = target / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self._tok.to_str(pretty=True), encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a ``tokenizer.json`` file or a folder containing one."""
        target = Path(path)
        if target.is_dir():
            target = target / TOKENIZER_FILE
        if not target.is_file():
            raise DataError(
                f"no tokenizer at '{path}': give a tokenizer.json file or a folder that contains one"
            )
        try:
            hf = HFTokenizer.from_file(str(target))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise DataError(f"cannot read tokenizer '{target}': {exc}; is it a tokenizer.json?") from exc
        return cls(hf)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


@functools.cache
def _symbol_bytes() -> dict[str, int]:
    """The ByteLevel alphabet's printable character -> the byte it stands for."""
    return {symbol: byte for byte, symbol in byte_symbols().items()}


def train_tokenizer(
    texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8192, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Train a tokenizer of ``kind`` on ``texts`` (a bounded sample; it is read exactly once)."""
    return Tokenizer(train_hf(texts, kind, vocab_size, special_tokens))


def _read_tree(path: str | Path) -> dict:
    """The parsed tokenizer.json as a reader of it gets it."""
    text = Path(path).read_text(encoding="utf-8")
    floats: list[str] = []
    tree = json.loads(text, parse_float=lambda literal: floats.append(literal) or float(literal))
    if floats:
        # The Rust reader may parse a float to a neighbouring double (Unigram scores do), so a
        # reload can hold other values than the file says: take what a reader really gets.
        return json.loads(Tokenizer.load(path).hf.to_str())
    return tree


def file_sha256(path: str | Path) -> str:
    """``Tokenizer.load(path).sha256()``, without building the tokenizer when the file holds no floats."""
    return hashlib.sha256(_canonical(_read_tree(path)).encode("utf-8")).hexdigest()


# Parts of a tokenizer.json that decide the ids of a text or the text of ids. Left out: "version" (the
# file format's) and a post-processor that adds nothing (_adds_nothing), which tools such as transformers'
# save_pretrained write into a copy. A post-processor that does add tokens is kept even though lmforge
# encodes without special tokens: the file travels into exports, whose users get them by default.
_BEHAVIOUR_KEYS = (
    "model",
    "normalizer",
    "pre_tokenizer",
    "added_tokens",
    "post_processor",
    "decoder",
    "truncation",  # when set, encoding cuts ids
    "padding",  # when set, batch encoding adds pad ids
)


def _adds_nothing(proc: dict | None) -> bool:
    """Whether a post-processor leaves every encoding's ids as they are, special tokens requested or not."""
    if proc is None or proc.get("type") == "ByteLevel":  # ByteLevel post-processing only trims offsets
        return True
    if proc.get("type") == "Sequence":
        return all(_adds_nothing(p) for p in proc.get("processors", []))
    if proc.get("type") != "TemplateProcessing":
        return False  # e.g. BertProcessing, RobertaProcessing: they add [CLS]/[SEP]-style tokens

    def pieces(template: list) -> list:  # type ids are dropped: no causal LM reads them
        return [(kind, spec.get("id")) for piece in template for kind, spec in piece.items()]

    return pieces(proc.get("single", [])) == [("Sequence", "A")] and pieces(proc.get("pair", [])) == [
        ("Sequence", "A"),
        ("Sequence", "B"),
    ]


def tokenizer_id(source: Tokenizer | str | Path) -> str:
    """Hex sha256 of what a tokenizer does (not of its file's bytes): equal for copies that encode and
    decode alike, e.g. a tokenizer and the copy transformers' save_pretrained writes with a no-op
    post-processor. ``source`` is a Tokenizer or a tokenizer.json path."""
    tree = json.loads(source.hf.to_str()) if isinstance(source, Tokenizer) else _read_tree(source)
    parts = {key: tree.get(key) for key in _BEHAVIOUR_KEYS}
    if _adds_nothing(parts["post_processor"]):
        parts["post_processor"] = None
    parts["added_tokens"] = sorted(parts["added_tokens"] or [], key=lambda t: t.get("id", -1))
    model = parts["model"]
    if isinstance(model, dict) and isinstance(model.get("merges"), list):
        # Older tokenizers write a BPE merge as "a b", newer ones as ["a", "b"]: the same merge.
        merges = [m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m for m in model["merges"]]
        parts["model"] = {**model, "merges": merges}
    return hashlib.sha256(_canonical(parts).encode("utf-8")).hexdigest()
