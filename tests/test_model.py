"""The reference GPT: config presets, parameter counts, shapes, errors, init and learning."""

from __future__ import annotations

import math

import pytest
import torch

from gptfast import GPT, BigramLanguageModel, GPTConfig, PRESETS


def test_gpt2_124m_parameter_count():
    # GPT-2 small with tied embeddings: the number quoted by nanoGPT / the released checkpoint.
    assert GPT(GPTConfig.from_preset("gpt2")).num_params() == 124_439_808


def test_book_variant_parameter_count():
    # "Build a Large Language Model (From Scratch)", ch. 4: untied head, no qkv bias.
    config = GPTConfig.from_preset("gpt2", tie_weights=False, qkv_bias=False)
    assert GPT(config).num_params() == 163_009_536


@pytest.mark.parametrize(
    "name,n_layer,n_head,n_embd",
    [("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600)],
)
def test_larger_presets(name, n_layer, n_head, n_embd):
    c = GPTConfig.from_preset(name)
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (n_layer, n_head, n_embd, 50257, 1024)
    # Closed-form count (no model built: they are large): embeddings + layers + final LN.
    per_layer = 2 * 2 * n_embd + (n_embd * 3 * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd) \
        + (n_embd * 4 * n_embd + 4 * n_embd) + (4 * n_embd * n_embd + n_embd)
    expected = 50257 * n_embd + 1024 * n_embd + n_layer * per_layer + 2 * n_embd
    assert {"gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}[name] == expected


def test_presets_all_build_configs():
    for name in PRESETS:
        c = GPTConfig.from_preset(name)
        assert c.head_dim * c.n_head == c.n_embd


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n_embd=65, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.5), "dropout"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    ],
)
def test_bad_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        GPTConfig.from_preset("tiny", **kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 3})


def test_config_dict_round_trip():
    c = GPTConfig.from_preset("gpt2", dropout=0.1, bias=False)
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_forward_shapes_and_loss_at_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    idx = torch.randint(0, 65, (3, 17))
    targets = torch.randint(0, 65, (3, 17))  # independent of idx (tied weights favour idx itself)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 17, 65)
    # At init the prediction is near uniform: loss ~ ln(65) = 4.17.
    assert abs(loss.item() - math.log(65)) < 0.3
    assert model(idx)[1] is None


def test_sequence_longer_than_block_size_names_both_numbers():
    model = GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"65.*64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_weight_tying_and_init_scale():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2", n_layer=4)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    # Residual projections are scaled by 1/sqrt(2 * n_layer); others have std 0.02.
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(8)) < 0.001
    assert torch.all(model.transformer.h[0].mlp.c_fc.bias == 0)
    untied = GPT(GPTConfig.from_preset("tiny", tie_weights=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_bias_false_has_no_biases():
    model = GPT(GPTConfig.from_preset("tiny", bias=False))
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_overfits_one_batch(backend):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"), backend=backend)
    x = torch.randint(0, 65, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"{backend}: loss {loss.item():.4f} after 150 steps on one batch"


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.5), backend="reference")
    idx = torch.randint(0, 65, (2, 16))
    model.eval()
    a, b = model(idx)[0], model(idx)[0]
    assert torch.equal(a, b)
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_backend_names_validated():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        GPT(GPTConfig.from_preset("tiny"), backend="fast")


def test_bigram_baseline_learns():
    torch.manual_seed(0)
    m = BigramLanguageModel(8)
    # Deterministic successor: token t is always followed by (t + 1) % 8.
    x = torch.arange(8).repeat(4, 4)
    y = (x + 1) % 8
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    for _ in range(200):
        loss = m(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = m.generate(torch.tensor([[3]]), 5)
    assert out.shape == (1, 6)


# ----------------------------------------------------------------------------- one forward, with a KV cache


def _cached_model(backend="reference", **over):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", block_size=16, dropout=0.0, **over)
    return GPT(cfg, backend=backend).eval()


@pytest.mark.parametrize("backend", ["reference", "torch", "native"])
def test_prefill_then_decode_equals_the_plain_forward(backend):
    """The cached forward (a prompt pass, then one token per row at its own position) gives the
    logits the plain forward gives on the whole sequence, for right-padded prompts of different
    lengths, and the cache's per-row lengths follow."""
    m = _cached_model(backend)
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8]]
    P = [5, 3]  # prompt lengths; the rest is fed one token at a time
    m.setup_caches(2, 16)
    with torch.no_grad():
        toks = torch.tensor([s[:5] for s in seqs])
        toks[1, 3:] = 0  # padding of the shorter prompt
        lens = torch.tensor(P)
        first, _ = m(toks, input_pos=torch.arange(5), lengths=lens, last_only=True)
        assert first.shape == (2, 1, m.config.vocab_size)
        assert m.kv_caches[0].lens.tolist() == P
        got = [[first[0, 0]], [first[1, 0]]]
        for step in range(3):
            pos = torch.tensor([[P[0] + step], [P[1] + step]])
            tok = torch.tensor([[seqs[0][P[0] + step]], [seqs[1][P[1] + step]]])
            logits, _ = m(tok, input_pos=pos)
            got[0].append(logits[0, 0])
            got[1].append(logits[1, 0])
        assert m.kv_caches[-1].lens.tolist() == [P[0] + 3, P[1] + 3]
        for b, s in enumerate(seqs):
            full, _ = m(torch.tensor([s]))
            want = full[0, P[b] - 1:P[b] + 3]
            torch.testing.assert_close(torch.stack(got[b]), want, rtol=1e-5, atol=1e-5)


def test_prefill_into_chosen_rows_leaves_the_others():
    m = _cached_model()
    m.setup_caches(3, 16)
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3]] * 3), input_pos=torch.arange(3))
        before = [c.k.clone() for c in m.kv_caches]
        m(torch.tensor([[7, 7, 7, 7]]), input_pos=torch.arange(4), rows=torch.tensor([1]))
    for c, old in zip(m.kv_caches, before):
        assert torch.equal(c.k[0], old[0]) and torch.equal(c.k[2], old[2]) and not torch.equal(c.k[1], old[1])
        assert c.lens.tolist() == [3, 4, 3]


def test_cached_forward_bad_arguments_name_them():
    m = _cached_model()
    idx = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"input_pos needs a KV cache; call model.setup_caches"):
        m(idx, input_pos=torch.arange(3))
    with pytest.raises(ValueError, match=r"setup_caches: max_seq_length 17 exceeds the block size 16"):
        m.setup_caches(1, 17)
    with pytest.raises(ValueError, match=r"setup_caches: max_batch_size must be an int >= 1, got 0"):
        m.setup_caches(0, 8)
    m.setup_caches(2, 8)
    with pytest.raises(ValueError, match=r"input_pos must be an int64 tensor, got torch.int32"):
        m(idx, input_pos=torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"a prompt pass starts at position 0"):
        m(idx, input_pos=torch.arange(1, 4))
    with pytest.raises(ValueError, match=r"input_pos must be \(T,\) = 0..T-1 for a prompt pass or \(B, 1\)"):
        m(idx, input_pos=torch.arange(2))
    with pytest.raises(ValueError, match=r"prompt length 9 exceeds the cache length 8"):
        m(torch.ones(1, 9, dtype=torch.long), input_pos=torch.arange(9))
    with pytest.raises(ValueError, match=r"a decode step takes idx \(B, 1\) and input_pos \(B, 1\) with B the cache's batch 2"):
        m(torch.tensor([[1]]), input_pos=torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"input_pos must lie in \[0, 8\) \(the cache length\), got \[0, 8\]"):
        m(torch.tensor([[1], [2]]), input_pos=torch.tensor([[0], [8]]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 3\], got \[4\]"):
        m(idx, input_pos=torch.arange(3), lengths=torch.tensor([4]))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\), got \[2\]"):
        m(idx, input_pos=torch.arange(3), rows=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"targets \(training\) and input_pos \(cached inference\) do not mix"):
        m(idx, idx, input_pos=torch.arange(3))
    with pytest.raises(ValueError, match=r"rows / lengths need input_pos"):
        m(idx, lengths=torch.tensor([3]))
    m.clear_caches()
    assert m.kv_caches is None


def test_cache_is_not_part_of_the_state_dict():
    m = _cached_model()
    keys = set(m.state_dict())
    m.setup_caches(1, 8)
    assert set(m.state_dict()) == keys


def test_linear_layers_are_nn_linear_with_the_same_state_dict():
    """The model's linears run through ops.linear but stay nn.Linear (isinstance, parameters,
    state dict names), so nanoGPT / HF weights map one-to-one and optimizers see them."""
    m = _cached_model()
    assert isinstance(m.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert "transformer.h.0.mlp.c_fc.weight" in m.state_dict()
