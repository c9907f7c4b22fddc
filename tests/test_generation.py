"""Reference generation (no KV cache): determinism, greedy equivalences, cropping, stopping."""

from __future__ import annotations

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.generation import generate_reference


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", block_size=16), backend="reference").eval()


def _greedy_by_hand(model, idx, n):
    """Independent greedy loop: full logits, argmax, cropped to the block size."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_temperature_zero_is_deterministic_greedy(model):
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = generate_reference(model, idx, 30, temperature=0.0)
    b = generate_reference(model, idx, 30, temperature=0.0)
    assert torch.equal(a, b)
    # 30 new tokens from a 3-token prompt crosses the block size (16): exercises cropping.
    assert torch.equal(a, _greedy_by_hand(model, idx, 30))


def test_top_k_one_equals_greedy(model):
    idx = torch.tensor([[7, 8]])
    greedy = generate_reference(model, idx, 20, temperature=0.0)
    assert torch.equal(generate_reference(model, idx, 20, temperature=1.3, top_k=1, seed=5), greedy)


def test_seeded_sampling_reproducible_and_seed_sensitive(model):
    idx = torch.tensor([[1, 2]])
    a = generate_reference(model, idx, 40, temperature=1.0, seed=42)
    b = generate_reference(model, idx, 40, temperature=1.0, seed=42)
    c = generate_reference(model, idx, 40, temperature=1.0, seed=43)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_model_generate_nanogpt_signature(model):
    idx = torch.tensor([[1, 2, 3]])
    out = model.generate(idx, 5, temperature=0.0)
    assert out.shape == (1, 8)
    assert torch.equal(out[:, :3], idx)
    out = model.generate(idx, 5, 0.8, 10)  # positional (idx, max_new_tokens, temperature, top_k)
    assert out.shape == (1, 8)


def test_stops_at_eot_and_pads_finished_rows(model):
    idx = torch.tensor([[1, 2, 3], [3, 2, 1]])
    greedy = generate_reference(model, idx, 10, temperature=0.0)
    eot = int(greedy[0, 3])  # make row 0's first generated token the stop token
    out = generate_reference(model, idx, 10, temperature=0.0, eot_token=eot)
    assert out[0, 3] == eot
    assert torch.all(out[0, 3:] == eot)
    row1 = greedy[1, 3:].tolist()
    if eot in row1:
        stop = row1.index(eot)
        assert out[1, 3:3 + stop + 1].tolist() == row1[: stop + 1]
    else:
        assert out[1].tolist() == greedy[1].tolist()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="idx"):
        generate_reference(model, torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_reference(model, torch.tensor([[1]]), -1)
    with pytest.raises(ValueError, match="top_p"):
        generate_reference(model, torch.tensor([[1]]), 2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate_reference(model, torch.tensor([[1]]), 2, temperature=float("nan"))
