"""Interop: Hugging Face GPT-2 directories, hub names (offline), nanoGPT ckpt.pt, gptfast
checkpoints, `save_pretrained` back to transformers, `load`, the CLI, pickle safety and the
sliding-window perplexity against Hugging Face's guide.

The truth is always an independent computation: a randomly initialised `transformers`
GPT2LMHeadModel (fp32, eager attention) saved through the real file formats, never our own output.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptfast import GPT, GPTConfig  # noqa: E402
from gptfast.errors import CheckpointError  # noqa: E402
from gptfast.io import from_pretrained, load, save_pretrained  # noqa: E402
from gptfast.tokenizers import CharTokenizer, GPT2Tokenizer  # noqa: E402

# fp32 end to end; the two implementations differ only in summation order (~1e-7 here).
ATOL = 1e-5
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def make_hf(vocab_size=300, n_positions=64, seed=0, **overrides) -> GPT2LMHeadModel:
    """A random GPT-2 (2 layers x 64 wide) in eval mode. initializer_range 0.1 (instead of 0.02)
    spreads the logits so greedy argmax is never decided by a ~1e-7 rounding difference."""
    torch.manual_seed(seed)
    kw = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab_size, n_positions=n_positions,
              bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, initializer_range=0.1,
              attn_implementation="eager")
    kw.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**kw)).eval()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def assert_close(got, want, atol=ATOL, what="logits"):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    if err.max() > atol:
        idx = torch.nonzero(err > atol)[:5].tolist()
        raise AssertionError(f"{what}: max |diff| {err.max():.3g} > {atol} at {idx}")


def hf_greedy(hf, prompt, n):
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                      pad_token_id=hf.config.eos_token_id, eos_token_id=None)
    return out


def to_nanogpt_state(hf) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel -> nanoGPT's documented layout (model.py): keys `transformer.wte.weight`,
    `transformer.h.0.attn.c_attn.weight`, ..., `lm_head.weight`, all Linear weights (out, in)."""
    out = {}
    for k, v in hf.state_dict().items():
        out[k] = v.t().contiguous() if k.endswith(CONV1D) else v.clone()
    return out


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """These tests check weight mapping, not kernels (tests/test_*ops* do that): run the ops on
    the `torch` backend so they do not depend on (or wait for) the JIT build of the native
    extension. test_hf_safetensors_dir_logits_and_greedy runs the default `auto` choice."""
    monkeypatch.setenv("GPTFAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def hf_model():
    return make_hf()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "gpt2-random"
    hf_model.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- Hugging Face in


def test_hf_safetensors_dir_logits_and_greedy(hf_model, hf_dir):
    # The file really holds Conv1D (in, out) weights, so the transpose is exercised.
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("h.0.mlp.c_fc.weight"))
        assert tuple(f.get_tensor(key).shape) == (64, 256)
    model = from_pretrained(hf_dir, backend="auto")
    assert model.config.block_size == 64 and model.config.vocab_size == 300
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids))
    prompt = ids[:1, :7]
    ours = model.generate(prompt, 20, temperature=0)
    assert torch.equal(ours, hf_greedy(hf_model, prompt, 20))


def test_hf_pytorch_model_bin(hf_model, tmp_path):
    # The legacy format: config.json + a torch.save'd state dict, read with weights_only=True.
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(2))
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids))
    prompt = ids[:1, :5]
    assert torch.equal(model.generate(prompt, 20, temperature=0), hf_greedy(hf_model, prompt, 20))


def test_hf_original_upload_layout(hf_model, tmp_path):
    # openai-community/gpt2's own file: GPT2Model keys (no "transformer." prefix), the old
    # `attn.bias` causal-mask buffers, no lm_head (tied).
    from safetensors.torch import save_file

    state = {k[len("transformer."):]: v.contiguous() for k, v in hf_model.state_dict().items()
             if k.startswith("transformer.")}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_model.config.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path / "config.json")  # a file inside the directory works too
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids))


def test_distilgpt2_style_config(tmp_path):
    # distilgpt2: fewer layers; here also an explicit n_inner != 4 * n_embd, another epsilon and
    # the other tanh-GELU spelling.
    hf = make_hf(n_layer=3, n_inner=96, layer_norm_epsilon=1e-6, activation_function="gelu_pytorch_tanh")
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    c = model.config
    assert (c.n_layer, c.n_inner, c.layer_norm_eps) == (3, 96, 1e-6)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(4))
    assert_close(our_logits(model, ids), hf_logits(hf, ids))


def test_untied_lm_head(tmp_path):
    hf = make_hf(tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 0.1)  # make sure it differs from wte
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert not model.config.tie_weights
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    assert_close(our_logits(model, ids), hf_logits(hf, ids))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"add_cross_attention": True}, "cross-attention"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"activation_function": "relu"}, "activation_function is 'relu'"),
        ({"model_type": "gpt_neo"}, "model_type"),
    ],
)
def test_rejects_configs_it_cannot_honour(hf_dir, tmp_path, change, message):
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    os.link(hf_dir / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(d)


def test_weights_not_matching_config(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["n_layer"] = 3  # the file holds 2 layers
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.link(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"n_layer is 3 but the state dict has 2 transformer block"):
        from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- Hugging Face out


@pytest.mark.parametrize("bias", [True, False])
def test_save_pretrained_loads_in_transformers(tmp_path, bias):
    torch.manual_seed(6)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=97, bias=bias)).eval()
    with torch.no_grad():  # non-trivial LayerNorm weights/biases, so a mapping slip shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["activation_function"] == "gelu_new"
    hf = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.n_positions == 48 and hf.config.vocab_size == 97
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(7))
    assert_close(hf_logits(hf, ids), our_logits(model, ids))
    # and back in: the round trip is lossless
    again = from_pretrained(out)
    assert_close(our_logits(again, ids), our_logits(model, ids), atol=0.0)


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(8)
    target = tmp_path / "export"
    first = GPT(GPTConfig.from_preset("tiny")).eval()
    save_pretrained(first, target)
    before = (target / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(GPT(GPTConfig.from_preset("tiny")), target)
    assert (target / "model.safetensors").read_bytes() == before  # old export intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left behind
    monkeypatch.undo()
    second = GPT(GPTConfig.from_preset("tiny")).eval()
    save_pretrained(second, target)  # replacing an existing export works
    ids = torch.randint(0, 65, (1, 10))
    assert_close(our_logits(from_pretrained(target), ids), our_logits(second, ids), atol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ----------------------------------------------------------------------------- nanoGPT


def write_nanogpt_ckpt(path: Path, hf, *, bias=True, compiled=True) -> dict:
    """A ckpt.pt as nanoGPT's train.py writes it: model / optimizer / model_args / iter_num /
    best_val_loss / config; torch.compile'd models prefix every key with `_orig_mod.`."""
    c = hf.config
    # nanoGPT's MLP is nn.GELU() (exact erf): only an HF model with the same GELU stands in for it
    assert c.activation_function == "gelu", "a nanoGPT stand-in needs activation_function='gelu'"
    state = to_nanogpt_state(hf)
    state.pop("lm_head.weight")
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: the same tensor, as nanoGPT
    if not bias:  # nanoGPT bias=False: no bias entries at all
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    if compiled:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                      bias=bias, vocab_size=c.vocab_size, dropout=0.0)
    ckpt = {
        "model": state, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 5000,
        "best_val_loss": torch.tensor(3.1), "config": {"dataset": "openwebtext", "learning_rate": 6e-4,
                                                       "compile": compiled, "dtype": "bfloat16"},
    }
    torch.save(ckpt, path)
    return ckpt


@pytest.fixture(scope="module")
def hf_padded():
    # nanoGPT's padded GPT-2 vocabulary
    return make_hf(vocab_size=50304, n_positions=32, seed=9, activation_function="gelu")


def test_nanogpt_padded_vocab_trimmed_by_default(hf_padded, tmp_path):
    p = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(p, hf_padded)
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(10))
    want = hf_logits(hf_padded, ids)  # (2, 32, 50304)

    model = from_pretrained(p)  # default: slice back to the GPT-2 vocabulary
    assert model.config.vocab_size == 50257
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_close(our_logits(model, ids), want[..., :50257])

    full = from_pretrained(p, trim_vocab=False)  # nanoGPT's sample.py behaviour
    assert full.config.vocab_size == 50304
    assert_close(our_logits(full, ids), want)

    m2, tok = load(p)
    assert isinstance(tok, GPT2Tokenizer) and m2.config.vocab_size == 50257


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)])
def test_nanogpt_small(tmp_path, bias, compiled):
    hf = make_hf(seed=11, activation_function="gelu")  # nanoGPT's nn.GELU()
    if not bias:  # the same function as a bias-free nanoGPT model
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    p = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(p, hf, bias=bias, compiled=compiled)
    model = from_pretrained(p)
    assert model.config.bias is bias and model.config.vocab_size == 300
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(12))
    assert_close(our_logits(model, ids), hf_logits(hf, ids))
    prompt = ids[:1, :6]
    assert torch.equal(model.generate(prompt, 20, temperature=0), hf_greedy(hf, prompt, 20))


def test_nanogpt_char_checkpoint_needs_a_tokenizer(tmp_path):
    hf = make_hf(vocab_size=65, seed=13, activation_function="gelu")
    p = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(p, hf)
    with pytest.raises(CheckpointError, match=r"meta\.pkl.*pass one"):
        load(p)
    chars = "".join(chr(ord("A") + i) for i in range(65))
    model, tok = load(p, tokenizer=CharTokenizer(chars))
    assert tok.vocab_size == 65 and model.config.vocab_size == 65


# ----------------------------------------------------------------------------- gptfast + load


def test_gptfast_checkpoint_through_interop(tmp_path):
    from gptfast.io.checkpoint import default_tokenizer, save_checkpoint

    torch.manual_seed(14)
    src = GPT(GPTConfig.from_preset("tiny"), backend="reference").eval()
    save_checkpoint(tmp_path / "ck", src, default_tokenizer(), step=3)
    ids = torch.randint(0, 65, (2, 30))
    model = from_pretrained(tmp_path / "ck", backend="reference")
    assert model.backend == "reference"
    assert_close(our_logits(model, ids), our_logits(src, ids), atol=0.0)
    m, tok = load(tmp_path / "ck")
    m.backend = "reference"
    assert tok == default_tokenizer()
    assert_close(our_logits(m, ids), our_logits(src, ids), atol=0.0)


def test_load_hf_dir_gives_gpt2_tokenizer(tmp_path):
    hf = make_hf(vocab_size=50257, n_positions=32, seed=15)
    hf.save_pretrained(tmp_path)
    model, tok = load(tmp_path)
    assert isinstance(tok, GPT2Tokenizer) and model.config.vocab_size == 50257


def test_not_found_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub name"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="hub name"):
        from_pretrained("no-such-model-xyz")  # not a known hub name: no network request either
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        from_pretrained(tmp_path / "empty")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="nanoGPT"):
        from_pretrained(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- hub names


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_hub_name_offline_gives_one_line_instructions(monkeypatch, no_network, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name, repo in [("gpt2", "openai-community/gpt2"), ("gpt2-xl", "openai-community/gpt2-xl")]:
        with pytest.raises(CheckpointError) as e:
            from_pretrained(name)
        msg = str(e.value)
        assert "\n" not in msg
        assert "HF_HUB_OFFLINE=1" in msg and f"https://huggingface.co/{repo}" in msg
        assert "config.json and model.safetensors" in msg


def test_hub_name_without_huggingface_hub(monkeypatch, no_network):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed.*download config.json"):
        from_pretrained("gpt2-medium")


def test_hub_name_download_path(monkeypatch, no_network, hf_model, hf_dir):
    # The online path, with snapshot_download replaced: cache miss first, then a download limited
    # to config.json + model.safetensors.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise FileNotFoundError("not in cache")
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = from_pretrained("gpt2")
    assert calls == [("openai-community/gpt2", ("config.json", "model.safetensors"), True),
                     ("openai-community/gpt2", ("config.json", "model.safetensors"), False)]
    ids = torch.randint(0, 300, (1, 12))
    assert_close(our_logits(model, ids), hf_logits(hf_model, ids))


# ----------------------------------------------------------------------------- pickle safety


class _Evil:
    """Unpickling this calls open(marker, "w"): the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_are_refused(tmp_path, hf_model):
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    cases = {}
    # a nanoGPT-looking ckpt.pt (torch zip format)
    cases["ckpt.pt"] = tmp_path / "ckpt.pt"
    torch.save({"model": {"x": evil}, "model_args": {"n_layer": 1}}, cases["ckpt.pt"])
    # a legacy raw pickle file
    cases["raw.pt"] = tmp_path / "raw.pt"
    with open(cases["raw.pt"], "wb") as f:
        pickle.dump({"model": evil, "model_args": {}}, f, protocol=2)
    # a Hugging Face directory whose pytorch_model.bin carries the payload
    hfd = tmp_path / "hfdir"
    hfd.mkdir()
    hf_model.config.save_pretrained(hfd)
    torch.save({"transformer.wte.weight": evil}, hfd / "pytorch_model.bin")
    cases["hfdir"] = hfd

    for name, path in cases.items():
        for loader in (from_pretrained, load):
            with pytest.raises(CheckpointError, match="refusing to load .*never unpickles arbitrary objects"):
                loader(path)
            assert not marker.exists(), f"{name}: the pickle payload ran"
    # The payload is live: plain pickle.load would have run it (so the test above can fail).
    with open(cases["raw.pt"], "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ----------------------------------------------------------------------------- perplexity


def hf_guide_perplexity(hf, input_ids, max_length, stride):
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide
    (https://huggingface.co/docs/transformers/perplexity), run on the HF model.

    One correction: the guide weights each window's mean loss by `num_valid_tokens - 1` ("the
    model only calculates loss over trg_len - 1 labels"), which holds for the first window only;
    a later window has trg_len < window length, so all trg_len labels are scored. The count below
    is the number of labels the loss really averaged over (valid labels after HF's shift).
    """
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf(ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        if num_loss_tokens:
            nll_sum += float(neg_log_likelihood) * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length, stride", [(64, 64), (64, 16), (48, 20), (33, 11)])
def test_sliding_window_perplexity_matches_hf_guide(hf_model, hf_dir, max_length, stride):
    from gptfast import perplexity
    model = from_pretrained(hf_dir)
    ids = torch.randint(0, 300, (1, 301), generator=torch.Generator().manual_seed(16))
    want_ppl, want_n = hf_guide_perplexity(hf_model, ids, max_length, stride)
    got_ppl, got_n = perplexity.sliding_window_perplexity(model, ids[0], max_length, stride)
    assert got_n == want_n
    assert got_ppl == pytest.approx(want_ppl, rel=1e-5)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gpt2_vocab_hf():
    return make_hf(vocab_size=50257, n_positions=64, seed=17)


@pytest.mark.parametrize("fmt", ["hf-dir", "nanogpt-ckpt"])
def test_cli_generate_from_hf_dir_and_nanogpt_ckpt(gpt2_vocab_hf, tmp_path, capsys, fmt):
    from gptfast.cli import main

    if fmt == "hf-dir":
        path = tmp_path / "hf"
        gpt2_vocab_hf.save_pretrained(path)
    else:  # the same weights with nanoGPT's exact GELU
        path = tmp_path / "ckpt.pt"
        gpt2_vocab_hf = make_hf(vocab_size=50257, n_positions=64, seed=17, activation_function="gelu")
        write_nanogpt_ckpt(path, gpt2_vocab_hf)
    prompt = "Hello, world"
    tok = GPT2Tokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    want = tok.decode(hf_greedy(gpt2_vocab_hf, ids, 8)[0].tolist())
    rc = main(["generate", "--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "8",
               "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.rstrip("\n") == want


def test_cli_generate_char_nanogpt_ckpt_one_line_error(tmp_path, capsys):
    from gptfast.cli import main

    p = tmp_path / "ckpt.pt"
    write_nanogpt_ckpt(p, make_hf(vocab_size=65, seed=18, activation_function="gelu"))
    rc = main(["generate", "--checkpoint", str(p), "--max-new-tokens", "3"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("gptfast: error: ") and err.count("\n") == 1 and "meta.pkl" in err


def test_gptfast_imports_without_transformers(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import gptfast, gptfast.io, gptfast.hf_patch\n"
            "try:\n    gptfast.patch(object())\nexcept ImportError as e:\n    print('ok', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok") and "transformers" in r.stdout
