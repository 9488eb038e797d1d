"""A small, self-contained stand-in for the Phi-3-vision tokenizer.

The official ``microsoft/Phi-3-vision-128k-instruct`` tokenizer is a SentencePiece-style BPE model with byte
fallback, 32000 base pieces and 45 added tokens (ids 32000..32044).  Tests and offline demos need something that
behaves the same way structurally without downloading anything, so this module generates an equivalent tokenizer
entirely in code:

* ids 0, 1, 2 are ``<unk>``, ``<s>`` and ``</s>``;
* ids 3..258 are the byte-fallback pieces ``<0x00>``..``<0xFF>`` (same positions as the official vocab);
* ids 259..31999 are ordinary pieces: printable ASCII characters (bare and ``"▁"``-prefixed), a built-in list of
  common English words (with their merge prefixes), ``"▁"`` itself at id 29871 (as in the official vocab) and
  deterministic pseudo-word filler;
* ids 32000..32044 are the official added tokens with the official flags.

The normalizer, post-processor and decoder chain mirror the official ``tokenizer.json``.  Token ids of ordinary
text differ from the official ones, but special-token ids, byte-fallback ids and the id of ``"▁"`` match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

__all__ = [
    "OFFICIAL_SPECIAL_TOKENS",
    "PHI3_CHAT_TEMPLATE",
    "build_tiny_tokenizer",
    "write_tokenizer_files",
]

SPIECE_UNDERLINE = "\u2581"
"""The SentencePiece word-boundary marker ``"▁"`` that replaces spaces."""

BASE_VOCAB_SIZE = 32000
"""Number of pieces in the BPE model (ids 0..31999), as in the official tokenizer."""

SPIECE_UNDERLINE_ID = 29871
"""Id of the lone ``"▁"`` piece, identical to the official tokenizer."""

_FIRST_BYTE_ID = 3
_FIRST_ORDINARY_ID = _FIRST_BYTE_ID + 256  # 259


def _official_special_tokens() -> tuple[tuple[int, str], ...]:
    tokens: list[tuple[int, str]] = [
        (0, "<unk>"),
        (1, "<s>"),
        (2, "</s>"),
        (32000, "<|endoftext|>"),
        (32001, "<|assistant|>"),
    ]
    tokens += [(32002 + i, f"<|placeholder{i + 1}|>") for i in range(4)]
    tokens += [(32006, "<|system|>"), (32007, "<|end|>"), (32008, "<|placeholder5|>"), (32009, "<|placeholder6|>")]
    tokens += [(32010, "<|user|>")]
    tokens += [(32011 + i, f"<|placeholder{i + 7}|>") for i in range(33)]
    tokens += [(32044, "<|image|>")]
    return tuple(tokens)


OFFICIAL_SPECIAL_TOKENS: tuple[tuple[int, str], ...] = _official_special_tokens()
"""Official special/added tokens of Phi-3-vision as ``(id, content)`` pairs, sorted by id."""

# Flags of the official added tokens (from the official tokenizer.json ``added_tokens``).  Every added token has
# lstrip=False, normalized=False and single_word=False; only the two sets below deviate from rstrip=True and
# special=True.
_NO_RSTRIP_IDS: frozenset[int] = frozenset({0, 1, 32000, 32006, 32007, 32010})
_NOT_SPECIAL_IDS: frozenset[int] = frozenset({2})

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = ("<|system|>", "<|end|>", "<|user|>", "<|end|>")
"""``additional_special_tokens`` exactly as listed in the official files (``<|end|>`` appears twice there)."""

PHI3_CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '<|assistant|>' + '\n' }}"
    "{% endif %}"
)
"""Jinja chat template equivalent to the official Phi-3-vision one.

Each message renders as ``<|role|>\\n{content}<|end|>\\n``; with ``add_generation_prompt`` and a last message that is
not from the assistant, ``<|assistant|>\\n`` is appended.
"""

# A few hundred common English words; each gets "▁word", "▁Word" and bare "Word" pieces (plus merge prefixes).
_COMMON_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by hot
word but what some we can out other were all there when up use your how said an each she which do their time if
will way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any new
work part take get place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found answer school
grow study still learn plant cover food sun four between state keep eye never last let thought city tree cross farm
hard start might story saw far sea draw left late run while press close night real life few north open seem
together next white children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea fish mountain stop once
base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red list though
feel talk bird soon body dog family direct pose leave song measure door product black short numeral class wind
question happen complete ship area half rock order fire south problem piece told knew pass since top whole king
space heard best hour better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong special mind behind clear
tail produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon
island foot system busy test record boat common gold possible plane dry wonder laugh thousand ago ran check game
shape miss brought heat snow tire bring yes distant fill east paint language among image picture photo model text
vision hello please thank thanks sorry user assistant describe chart table answer question data value show shows
"""

_PRINTABLE_ASCII: tuple[str, ...] = tuple(chr(c) for c in range(0x21, 0x7F))  # "!".."~" (space becomes "▁")

_FILLER_ONSETS: tuple[str, ...] = tuple("bcdfghjklmnprstvwyz") + (
    "bl",
    "br",
    "ch",
    "cl",
    "cr",
    "dr",
    "fl",
    "fr",
    "gl",
    "gr",
    "pl",
    "pr",
    "sh",
    "sl",
    "sp",
    "st",
    "th",
    "tr",
)
_FILLER_NUCLEI: tuple[str, ...] = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "io")
_FILLER_CODAS: tuple[str, ...] = ("", "", "", "n", "r", "s", "l", "m", "t", "nd", "st")


def _common_words() -> list[str]:
    """Return the built-in common words, lower-case and de-duplicated, in their listed order."""
    return list(dict.fromkeys(_COMMON_WORDS.split()))


def _prefixes(piece: str) -> list[str]:
    """Return all prefixes of ``piece`` of length >= 2 (the pieces needed to build it left to right)."""
    return [piece[:end] for end in range(2, len(piece) + 1)]


def _filler_words() -> Iterator[str]:
    """Yield an endless deterministic stream of ``"▁"``-prefixed pseudo-words made of 2-3 syllables."""
    syllables = [o + n + c for o in _FILLER_ONSETS for n in _FILLER_NUCLEI for c in dict.fromkeys(_FILLER_CODAS)]
    count = len(syllables)
    state = 0x2545F491
    while True:
        # xorshift32: a tiny, version-independent pseudo-random generator.
        parts = []
        for _ in range(3):
            state ^= (state << 13) & 0xFFFFFFFF
            state ^= state >> 17
            state ^= (state << 5) & 0xFFFFFFFF
            parts.append(syllables[state % count])
        n_syllables = 3 if state & 0b11 == 0 else 2
        yield SPIECE_UNDERLINE + "".join(parts[:n_syllables])


@lru_cache(maxsize=1)
def _base_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Compute the 32000 base pieces (index == id) and the BPE merges.

    Merge order guarantees that known words encode to their whole-word piece: every merge producing a
    ``"▁"``-prefixed piece ranks before every merge producing a bare piece, and bare multi-character pieces all
    start with an upper-case letter (capitalised words after a newline or punctuation).  Each multi-character piece
    is built left to right by appending one character to a prefix that is itself in the vocabulary, so a word's
    ``"▁"`` token greedily grows to the longest known prefix before bare merges run.
    """
    pieces: dict[str, None] = {}

    def add(piece: str) -> None:
        pieces.setdefault(piece, None)

    for char in _PRINTABLE_ASCII:
        add(char)
    for char in _PRINTABLE_ASCII:
        add(SPIECE_UNDERLINE + char)
    for word in _common_words():
        capitalised = word[:1].upper() + word[1:]
        for form in (SPIECE_UNDERLINE + word, SPIECE_UNDERLINE + capitalised, capitalised):
            for prefix in _prefixes(form):
                add(prefix)

    # Merges only for the pieces built so far; filler pseudo-words only need to decode.
    mergeable = [piece for piece in pieces if len(piece) >= 2]
    spaced = sorted((p for p in mergeable if p.startswith(SPIECE_UNDERLINE)), key=len)
    bare = sorted((p for p in mergeable if not p.startswith(SPIECE_UNDERLINE)), key=len)
    merges = tuple((piece[:-1], piece[-1]) for piece in spaced + bare)

    n_ordinary = BASE_VOCAB_SIZE - _FIRST_ORDINARY_ID - 1  # minus the lone "▁" inserted below
    if len(pieces) > n_ordinary:
        raise AssertionError("built-in word list is too large for the base vocabulary")
    fillers = _filler_words()
    while len(pieces) < n_ordinary:
        candidate = next(fillers)
        if candidate not in pieces:
            add(candidate)

    ordinary = list(pieces)
    ordinary.insert(SPIECE_UNDERLINE_ID - _FIRST_ORDINARY_ID, SPIECE_UNDERLINE)
    vocab = [UNK_TOKEN, BOS_TOKEN, "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + ordinary
    if len(vocab) != BASE_VOCAB_SIZE or len(set(vocab)) != BASE_VOCAB_SIZE:
        raise AssertionError("base vocabulary must hold exactly 32000 unique pieces")
    return tuple(vocab), merges


def _added_token_flags(token_id: int) -> dict[str, bool]:
    """Return the official flags of the added token with id ``token_id``."""
    return {
        "lstrip": False,
        "normalized": False,
        "rstrip": token_id not in _NO_RSTRIP_IDS,
        "single_word": False,
        "special": token_id not in _NOT_SPECIAL_IDS,
    }


def _added_token(token_id: int, content: str) -> AddedToken:
    flags = _added_token_flags(token_id)
    return AddedToken(
        content,
        single_word=flags["single_word"],
        lstrip=flags["lstrip"],
        rstrip=flags["rstrip"],
        normalized=flags["normalized"],
        special=flags["special"],
    )


def build_tiny_tokenizer() -> Tokenizer:
    """Build the tiny Phi-3-vision-like tokenizer (32045 ids) from scratch.

    Returns:
        A fresh :class:`tokenizers.Tokenizer` with a byte-fallback BPE model, the official normalizer
        (prepend ``"▁"``, replace spaces by ``"▁"``), no pre-tokenizer, a ``<s>``-prepending template post-processor,
        the official decoder chain and the official added tokens at ids 0..2 and 32000..32044.
    """
    vocab, merges = _base_vocab_and_merges()
    model = models.BPE(
        vocab={piece: index for index, piece in enumerate(vocab)},
        merges=list(merges),
        unk_token=UNK_TOKEN,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tokenizer.pre_tokenizer = None
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, 1)],
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # Added tokens must be registered in id order: new ones get consecutive ids starting at 32000.
    tokenizer.add_tokens([_added_token(token_id, content) for token_id, content in OFFICIAL_SPECIAL_TOKENS])
    for token_id, content in OFFICIAL_SPECIAL_TOKENS:
        if tokenizer.token_to_id(content) != token_id:
            raise AssertionError(f"added token {content!r} did not land on id {token_id}")
    return tokenizer


def _special_token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _tokenizer_config() -> dict[str, Any]:
    added_tokens_decoder = {
        str(token_id): {"content": content, **_added_token_flags(token_id)}
        for token_id, content in OFFICIAL_SPECIAL_TOKENS
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS_TOKEN,
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK_TOKEN,
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": _special_token_entry(BOS_TOKEN),
        "eos_token": _special_token_entry(EOS_TOKEN),
        "pad_token": _special_token_entry(PAD_TOKEN),
        "unk_token": _special_token_entry(UNK_TOKEN),
    }


def write_tokenizer_files(directory: str | os.PathLike[str]) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``directory``.

    The directory is created if needed.  The files mirror the layout and keys of the official Phi-3-vision
    tokenizer files, so the directory can be loaded with ``transformers`` like a downloaded checkpoint.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(target / "tokenizer.json"), pretty=False)
    for name, content in (
        ("tokenizer_config.json", _tokenizer_config()),
        ("special_tokens_map.json", _special_tokens_map()),
    ):
        with open(target / name, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
