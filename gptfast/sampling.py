"""What happens to a step's logits before a token is drawn, and the arguments that say how.

`SamplingParams` carries the sampling settings of a generation (checked once, when made);
`apply_repetition_penalty` and `token_logprobs` are the logits processing `gptfast.generate`
applies. The draw itself is `gptfast.ops.sample` (the uniforms are drawn once, in the dispatch
layer: `ops.draw_uniform`, so every backend consumes a generator identically).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from gptfast.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How each token is chosen.

    temperature (0 = greedy), top_k, top_p: as `gptfast.ops.sample` (temperature, then top-k, then
    top-p). repetition_penalty: CTRL penalty (1.0 = off) applied to the logits first, over every
    token already in the row (prompt included), as Hugging Face does.
    seed: None (global RNG), an int (one generator for the whole batch, drawing one uniform per
    row per step as `ops.sample` does, so a batch == `generate_reference(seed=...)` on the same
    batch), or a list of B ints (row b draws from its own generator seeded seeds[b]: row b then
    gets exactly the tokens it gets when generated alone with seed=seeds[b]). generator: an
    explicit `torch.Generator` for the batch instead of seed.
    eot_token: a row that samples it stops (the token is included in its output).
    return_logprobs: also return per-token log-probs (see `token_logprobs`).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | Sequence[int] | None = None
    generator: torch.Generator | None = None
    eot_token: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
            raise InputError(f"generate: temperature must be a finite number >= 0, got {t!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise InputError(f"generate: top_k must be a positive int or None, got {k!r}")
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 < p <= 1.0):
            raise InputError(f"generate: top_p must be in (0, 1] or None, got {p!r}")
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0):
            raise InputError(f"generate: repetition_penalty must be a finite number > 0, got {r!r}")
        if self.generator is not None and self.seed is not None:
            raise InputError("generate: pass either seed or generator, not both")
        s = self.seed
        if isinstance(s, (list, tuple)):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
                raise InputError(f"generate: seed list must hold ints, got {s!r}")
        elif s is not None and (not isinstance(s, int) or isinstance(s, bool)):
            raise InputError(f"generate: seed must be an int, a list of ints or None, got {s!r}")
        if self.eot_token is not None and (not isinstance(self.eot_token, int) or isinstance(self.eot_token, bool)
                                           or self.eot_token < 0):
            raise InputError(f"generate: eot_token must be a token id (int >= 0) or None, got {self.eot_token!r}")

    def generators(self, batch: int, device: torch.device) -> list[torch.Generator | None]:
        """One generator for the batch, or one per row (a seed list of `batch` seeds)."""
        if isinstance(self.seed, (list, tuple)):
            if len(self.seed) != batch:
                raise InputError(f"generate: seed list must have one seed per prompt ({batch}), got {len(self.seed)}")
            return [torch.Generator(device=device).manual_seed(int(s)) for s in self.seed]
        if self.seed is not None:
            return [torch.Generator(device=device).manual_seed(int(self.seed))]
        return [self.generator]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as Hugging Face's
    `RepetitionPenaltyLogitsProcessor`: a token already in the sequence (prompt included) has a
    positive logit divided by `penalty` and a negative one multiplied by it.

    logits: (B, V) fp32; seen: (B, V) bool. Returns a new (B, V) tensor.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def token_logprobs(logits: torch.Tensor, temperature: float, tokens: torch.Tensor) -> torch.Tensor:
    """log-probability of `tokens` (B,) under softmax(logits / temperature), (B,) fp32.

    The generation loop passes the logits after the repetition penalty; temperature 0 (greedy)
    counts as 1. top-k / top-p truncation is *not* applied, so every value is finite and comparable
    across truncation settings (the draw itself does use the truncated distribution).
    """
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, dim=-1).gather(1, tokens.view(-1, 1)).squeeze(1)
