"""Tests for gptfast.data: text loading, token cache, splitting and batching."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

import gptfast.data as data
from gptfast.data import (
    BatchSampler,
    SlidingWindowDataset,
    create_dataloader,
    encode_file,
    load_text,
    train_val_split,
)
from gptfast.tokenizers import CharTokenizer, GPT2Tokenizer

# --------------------------------------------------------------------------------------
# load_text
# --------------------------------------------------------------------------------------


def test_load_text_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        encode_file(missing, CharTokenizer("ab"))


def test_load_text_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text(empty)
    with pytest.raises(ValueError, match="empty"):
        encode_file(empty, GPT2Tokenizer(), cache_dir=tmp_path / "cache")


def test_load_text_reads_utf8(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("café\n".encode("utf-8"))
    assert load_text(p) == "café\n"


def test_load_tiny_shakespeare(shakespeare_path):
    text = load_text(shakespeare_path)
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


# --------------------------------------------------------------------------------------
# encode_file and its cache
# --------------------------------------------------------------------------------------


def test_encode_file_char(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcab", encoding="utf-8")
    ids = encode_file(p, CharTokenizer("abc"))
    assert ids.dtype == np.uint16
    assert ids.tolist() == [0, 1, 2, 0, 1]


def _bins(d):
    return sorted(x for x in os.listdir(d) if x.endswith(".bin"))


def test_encode_file_bpe_cache_next_to_file(tmp_path, monkeypatch):
    # XDG cache pointed inside tmp_path, so the test never touches the real ~/.cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    p = tmp_path / "corpus.txt"
    p.write_text("Hello world", encoding="utf-8")
    tokenizer = GPT2Tokenizer()
    ids = encode_file(p, tokenizer)
    assert ids.dtype == np.uint16
    assert ids.tolist() == [15496, 995]

    bins = _bins(tmp_path)
    assert len(bins) == 1 and bins[0].startswith("corpus.txt.gpt2")
    bin_path = tmp_path / bins[0]
    meta_path = bin_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    assert meta == {
        # sha256 of b"Hello world"
        "sha256": "64ec88ca00b268e5ba1a35678a1b5316d212f4f366b2477232534a8aeca37f3c",
        "tokenizer": {"type": "gpt2"},
        "num_tokens": 2,
        "dtype": "uint16",
    }
    assert bin_path.read_bytes() == np.array([15496, 995], dtype="<u2").tobytes()
    assert not (tmp_path / "xdg").exists()

    # Second call: served from the cache -- encoding would raise, files are not rewritten.
    mtime = bin_path.stat().st_mtime_ns
    monkeypatch.setattr(GPT2Tokenizer, "encode", lambda self, text: pytest.fail("cache not used"))
    again = encode_file(p, tokenizer)
    assert again.tolist() == [15496, 995]
    assert bin_path.stat().st_mtime_ns == mtime


def test_encode_file_cache_invalidated_by_modified_text(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    p = tmp_path / "corpus.txt"
    p.write_text("Hello world", encoding="utf-8")
    tokenizer = GPT2Tokenizer()
    assert encode_file(p, tokenizer).tolist() == [15496, 995]
    calls = []
    real_encode = GPT2Tokenizer.encode
    monkeypatch.setattr(GPT2Tokenizer, "encode", lambda self, text: calls.append(text) or real_encode(self, text))
    p.write_text("Hello, world!", encoding="utf-8")
    assert encode_file(p, tokenizer).tolist() == [15496, 11, 995, 0]
    assert calls == ["Hello, world!"]
    # the cache now describes the new text (same files, replaced)
    (bin_name,) = _bins(tmp_path)
    assert json.loads((tmp_path / bin_name).with_suffix(".json").read_text())["num_tokens"] == 4
    assert encode_file(p, tokenizer).tolist() == [15496, 11, 995, 0]
    assert len(calls) == 1


def test_encode_file_corrupt_cache_is_rebuilt(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("Hello world", encoding="utf-8")
    tokenizer = GPT2Tokenizer()
    encode_file(p, tokenizer, cache_dir=tmp_path / "c")
    (bin_name,) = _bins(tmp_path / "c")
    (tmp_path / "c" / bin_name).write_bytes(b"\x00\x00")  # truncated: 1 token instead of 2
    assert encode_file(p, tokenizer, cache_dir=tmp_path / "c").tolist() == [15496, 995]
    meta_path = (tmp_path / "c" / bin_name).with_suffix(".json")
    meta_path.write_text("{not json")
    assert encode_file(p, tokenizer, cache_dir=tmp_path / "c").tolist() == [15496, 995]
    assert json.loads(meta_path.read_text())["num_tokens"] == 2


def test_encode_file_readonly_dir_falls_back_to_xdg_cache(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    ro = tmp_path / "readonly"
    ro.mkdir()
    p = ro / "corpus.txt"
    p.write_text("Hello world", encoding="utf-8")
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # root ignores permission bits, so also make the writability probe say "no"
            real = data._dir_is_writable
            monkeypatch.setattr(data, "_dir_is_writable", lambda d: False if d == ro.resolve() else real(d))
        ids = encode_file(p, GPT2Tokenizer())
        assert ids.tolist() == [15496, 995]
        assert _bins(ro) == []
        cache = xdg / "gptfast" / "data"
        bins = _bins(cache)
        assert len(bins) == 1 and bins[0].startswith("corpus.txt.gpt2")
        # and the fallback cache is reused
        monkeypatch.setattr(GPT2Tokenizer, "encode", lambda self, text: pytest.fail("cache not used"))
        assert encode_file(p, GPT2Tokenizer()).tolist() == [15496, 995]
    finally:
        ro.chmod(stat.S_IRWXU)


def test_encode_file_explicit_cache_dir_and_tokenizers_coexist(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("Hello world", encoding="utf-8")
    cache = tmp_path / "cache" / "nested"
    encode_file(p, GPT2Tokenizer(), cache_dir=cache)
    assert len(_bins(cache)) == 1
    assert _bins(tmp_path) == []


def test_encode_file_tiny_shakespeare_gpt2(shakespeare_path, tmp_path):
    ids = encode_file(shakespeare_path, GPT2Tokenizer(), cache_dir=tmp_path)
    # nanoGPT's data/shakespeare/prepare.py reports 338,025 GPT-2 tokens for the whole file
    # (301,966 train + 36,059 val).
    assert ids.shape == (338_025,)
    assert ids[:2].tolist() == [5962, 22307]  # "First", " Citizen"


# --------------------------------------------------------------------------------------
# train_val_split
# --------------------------------------------------------------------------------------


def test_train_val_split():
    ids = np.arange(100, dtype=np.uint16)
    train, val = train_val_split(ids)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train, val = train_val_split(list(range(10)), train_frac=0.5)
    assert train.tolist() == [0, 1, 2, 3, 4] and val.tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="train_frac"):
        train_val_split(ids, train_frac=1.0)


# --------------------------------------------------------------------------------------
# BatchSampler
# --------------------------------------------------------------------------------------


def _sampler(seed=0, n_train=1000, n_val=100, block_size=8, batch_size=4, **kw):
    # ids equal to their positions make "shifted by one" checkable from values alone
    return BatchSampler(np.arange(n_train, dtype=np.uint16), np.arange(10_000, 10_000 + n_val, dtype=np.uint16),
                        block_size=block_size, batch_size=batch_size, seed=seed, **kw)


def test_batch_shapes_dtypes_and_shift():
    s = _sampler()
    for split, lo, hi in [("train", 0, 1000), ("val", 10_000, 10_100)]:
        x, y = s.get_batch(split)
        assert x.shape == (4, 8) and y.shape == (4, 8)
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.device.type == "cpu"
        assert torch.equal(y[:, :-1], x[:, 1:])
        # contiguous runs of the source: each row is start, start+1, ...
        assert torch.equal(x - x[:, :1], torch.arange(8).expand(4, 8))
        assert torch.equal(y, x + 1)
        assert int(x.min()) >= lo and int(y.max()) < hi


def test_batch_covers_the_last_token():
    # 9 tokens, block 8: the only valid start is 0 and y must end on the last token
    s = BatchSampler(np.arange(9), np.arange(9), block_size=8, batch_size=3, seed=1)
    x, y = s.get_batch("train")
    assert torch.equal(x, torch.arange(8).expand(3, 8))
    assert torch.equal(y, torch.arange(1, 9).expand(3, 8))


def test_batch_reproducible_with_seed_and_generator():
    a, b, c = _sampler(seed=123), _sampler(seed=123), _sampler(seed=124)
    xa = [a.get_batch("train")[0] for _ in range(3)]
    xb = [b.get_batch("train")[0] for _ in range(3)]
    xc = [c.get_batch("train")[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ids = np.arange(500)
    s1 = BatchSampler(ids, ids, 16, 8, generator=g1)
    s2 = BatchSampler(ids, ids, 16, 8, generator=g2)
    assert torch.equal(s1.get_batch("val")[0], s2.get_batch("val")[0])
    with pytest.raises(ValueError, match="not both"):
        BatchSampler(ids, ids, 16, 8, generator=torch.Generator(), seed=1)


def test_batch_state_dict_resume():
    a = _sampler(seed=5)
    a.get_batch("train")
    state = a.state_dict()
    expected = [a.get_batch("train") for _ in range(2)]
    b = _sampler(seed=999)
    b.load_state_dict(state)
    got = [b.get_batch("train") for _ in range(2)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    with pytest.raises(ValueError, match="generator"):
        b.load_state_dict({})


def test_batch_argument_errors():
    ids = np.arange(100)
    with pytest.raises(ValueError, match="block_size.*0"):
        BatchSampler(ids, ids, block_size=0, batch_size=2)
    with pytest.raises(ValueError, match="batch_size.*-3"):
        BatchSampler(ids, ids, block_size=4, batch_size=-3)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'.*'test'"):
        BatchSampler(ids, ids, 4, 2, seed=0).get_batch("test")


def test_batch_split_too_short():
    with pytest.raises(ValueError) as ei:
        BatchSampler(np.arange(100), np.arange(8), block_size=8, batch_size=2)
    msg = str(ei.value)
    assert "val" in msg and "8 tokens" in msg and "block_size=8" in msg
    with pytest.raises(ValueError, match="train split has 3 tokens"):
        BatchSampler(np.arange(3), np.arange(100), block_size=8, batch_size=2)


def test_batch_sampler_on_tiny_shakespeare(shakespeare_path):
    text = load_text(shakespeare_path)
    tokenizer = CharTokenizer.from_text(text)
    train, val = train_val_split(encode_file(shakespeare_path, tokenizer))
    assert len(train) == 1_003_854 and len(val) == 111_540  # nanoGPT shakespeare_char numbers
    s = BatchSampler(train, val, block_size=64, batch_size=2, seed=0)
    x, y = s.get_batch("val")
    for row in range(2):
        chunk = tokenizer.decode(x[row])
        assert chunk in text[1_003_854:]
        assert tokenizer.decode(y[row])[:-1] == chunk[1:]


# --------------------------------------------------------------------------------------
# SlidingWindowDataset / create_dataloader
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, max_length, stride, expected",
    [
        (100, 10, 5, 18),  # starts 0, 5, ..., 85 (start 90 would need token 100)
        (100, 10, 10, 9),  # starts 0, 10, ..., 80
        (100, 10, 1, 90),  # starts 0..89
        (11, 10, 3, 1),  # only start 0
        (100, 10, 100, 1),
    ],
)
def test_sliding_window_count(n, max_length, stride, expected):
    ds = SlidingWindowDataset(np.arange(n), max_length, stride)
    assert len(ds) == expected
    assert len(list(ds)) == expected  # iteration stops at len via IndexError


def test_sliding_window_values():
    ds = SlidingWindowDataset(np.arange(100, 200), max_length=4, stride=3)
    x, y = ds[0]
    assert x.tolist() == [100, 101, 102, 103] and y.tolist() == [101, 102, 103, 104]
    x, y = ds[2]
    assert x.tolist() == [106, 107, 108, 109] and y.tolist() == [107, 108, 109, 110]
    assert x.dtype == torch.int64
    # last sample: start 93 (96 would need index 100), targets end on the last token
    x, y = ds[-1]
    assert len(ds) == 32
    assert x.tolist() == [193, 194, 195, 196] and y.tolist() == [194, 195, 196, 197]
    with pytest.raises(IndexError):
        ds[32]


def test_sliding_window_errors():
    with pytest.raises(ValueError, match="max_length.*0"):
        SlidingWindowDataset(np.arange(10), 0, 1)
    with pytest.raises(ValueError, match="stride.*-1"):
        SlidingWindowDataset(np.arange(10), 4, -1)
    with pytest.raises(ValueError) as ei:
        SlidingWindowDataset(np.arange(10), 10, 1)
    assert "10 tokens" in str(ei.value) and "max_length=10" in str(ei.value)


def test_create_dataloader():
    ids = torch.arange(100)
    dl = create_dataloader(ids, batch_size=4, max_length=10, stride=5, shuffle=False)
    batches = list(dl)
    assert len(batches) == 4  # 18 samples, drop_last -> 4 full batches of 4
    x, y = batches[0]
    assert x.shape == (4, 10) and y.shape == (4, 10)
    assert x[:, 0].tolist() == [0, 5, 10, 15]
    assert torch.equal(y, x + 1)
    dl = create_dataloader(ids, batch_size=4, max_length=10, stride=5, shuffle=False, drop_last=False)
    assert [b[0].shape[0] for b in dl] == [4, 4, 4, 4, 2]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [x for x, _ in create_dataloader(ids, 4, 10, 5, generator=g1)]
    b = [x for x, _ in create_dataloader(ids, 4, 10, 5, generator=g2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    starts = [int(v) for bx in a for v in bx[:, 0]]
    assert starts != sorted(starts)  # actually shuffled
