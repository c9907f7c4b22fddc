"""The MLP activation (`GPTConfig.activation`): GPT-2's tanh GELU ("gelu_tanh") and the exact erf
GELU ("gelu", nanoGPT's nn.GELU(), Hugging Face "gelu") on every backend, forward and backward;
the native CPU kernel's vectorised erf against fp64; nanoGPT / Hugging Face import, export and
patch with each; KV-cached generation (fused native step and the model's forward step) with the exact GELU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import gptfast
import gptfast.hf_patch
import gptfast
from gptfast import GPT, GPTConfig, fused_decode, ops
from gptfast.errors import CheckpointError
from gptfast.io import from_pretrained, save_pretrained
from gptfast.ops import native, reference
from tests.helpers import assert_error_within, available_backends

ACTS = ("gelu_tanh", "gelu")
CPU_BACKENDS = available_backends("gelu_mlp", include_reference=True, dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def _all_cpu_backends():
    # every backend that runs on CPU must be here (triton under the interpreter, see conftest)
    assert set(CPU_BACKENDS) == {"reference", "torch", "native", "triton"}, CPU_BACKENDS


def _f32_ulp(v: torch.Tensor) -> torch.Tensor:
    """ulp of fp32 at |v| (fp64 result; the smallest normal's ulp below it)."""
    a = v.abs().float().clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.nextafter(a, torch.tensor(math.inf)) - a).double()


# ----------------------------------------------------------------------------- the erf itself


def test_native_erf_matches_fp64_over_the_whole_range():
    """csrc/cpu/simd.h erf_erfc against torch.erf in fp64: within 1.5 ulp everywhere, from
    denormal-sized |x| (erf = 2x/sqrt(pi)) through the erfc branch to saturation at 1."""
    g = torch.Generator().manual_seed(0)
    mag = torch.cat([
        torch.linspace(0, 12, 1_200_001),
        torch.logspace(-38, 1.2, 200_000),               # tiny |x| (relative accuracy)
        torch.rand(200_000, generator=g) * 3.0 + 0.5,    # around the branch switch at |x| = 1
    ])
    x = torch.cat([mag, -mag, torch.tensor([1e30, -1e30, 3e38])])
    got = torch.ops.gptfast.erf(x).double()
    want = torch.erf(x.double())
    ulps = (got - want).abs() / _f32_ulp(want)
    assert ulps.max() <= 1.5, f"max {ulps.max():.3g} ulp at x={x[ulps.argmax()].item()!r}"
    # torch's own fp32 erf, for scale: the error is of the same order
    theirs = ((torch.erf(x).double() - want).abs() / _f32_ulp(want)).max()
    assert ulps.max() <= 2.5 * max(theirs.item(), 0.5), (ulps.max(), theirs)
    special = torch.ops.gptfast.erf(torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan]))
    assert special[:4].tolist() == [0.0, -0.0, 1.0, -1.0] and special[4].isnan()
    assert torch.signbit(special[1])


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


@pytest.mark.parametrize("path", ["skinny", "addmm", "bwd"])
def test_native_exact_gelu_elementwise_tails(path):
    """Identity weights make gelu_mlp the bare GELU (x I = x exactly), so the kernel's
    gelu(x) = x Phi(x) and its derivative Phi(x) + x phi(x) are checked element by element
    against fp64 (erfc form; torch.special.ndtr underflows to 0 below x ~ -9), relative error included in the negative tail where
    1 + erf would cancel: within 8 ulp everywhere (measured <= 5; the exponential's argument is
    split from x itself, else the rounding of x / sqrt 2 alone costs ~x^2/2 ulp there)."""
    x = torch.cat([torch.linspace(-13.5, 8, 4000), torch.logspace(-30, 0, 96), -torch.logspace(-30, 0, 96)])
    n = 64
    x = x[: x.numel() // n * n].view(-1, n)
    rows = {"skinny": x[:8], "addmm": x, "bwd": x}[path]
    eye = torch.eye(n)
    if path == "bwd":
        xr = rows.clone().requires_grad_()
        y = ops.gelu_mlp(xr, eye, None, eye, None, activation="gelu", backend="native")
        y.backward(torch.ones_like(y))
        got = xr.grad.double()
        xd = rows.double()
        terms = [_ndtr(xd), xd * torch.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)]
        want = terms[0] + terms[1]
        scale = terms[0].abs() + terms[1].abs()  # gelu' crosses 0 at x = -0.75: ulps of its terms
    else:
        with torch.no_grad():
            got = ops.gelu_mlp(rows, eye, None, eye, None, activation="gelu", backend="native").double()
        xd = rows.double()
        want = xd * _ndtr(xd)
        scale = want
    ok = want.abs() > 1e-35  # below (x < -12.5), Phi(x) nears fp32's denormals and loses precision
    err = (got - want).abs()
    ulps = err / _f32_ulp(scale)
    bad = ok & (ulps > 8)
    assert not bad.any(), f"{int(bad.sum())} bad, e.g. x={xd[bad][0].item()}: {got[bad][0].item()} vs {want[bad][0].item()}"
    assert (err[~ok] < 1e-36).all()


# ----------------------------------------------------------------------------- gelu_mlp, every backend


def _mlp_inputs(M, C, Fh, C_out, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, C, generator=g, dtype=torch.float64)
    w_fc = torch.randn(Fh, C, generator=g, dtype=torch.float64) * (scale / math.sqrt(C))
    b_fc = torch.randn(Fh, generator=g, dtype=torch.float64) * 0.5
    w_proj = torch.randn(C_out, Fh, generator=g, dtype=torch.float64) / math.sqrt(Fh)
    b_proj = torch.randn(C_out, generator=g, dtype=torch.float64) * 0.1
    return [x, w_fc, b_fc, w_proj, b_proj]


def _fwd_bwd(fn, inputs, dy):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*ins)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in ins]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M,C,Fh,C_out", [(5, 16, 48, 16), (37, 24, 96, 20)])  # skinny / addmm paths
def test_gelu_mlp_fwd_bwd_against_fp64(activation, backend, M, C, Fh, C_out):
    # scale 3: pre-activations spread to |x| ~ 3-10, where the two GELUs differ by up to ~1e-3
    inputs = _mlp_inputs(M, C, Fh, C_out, seed=M, scale=3.0)
    dy = torch.randn(M, C_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _fwd_bwd(lambda *a: reference.gelu_mlp(*a, activation=activation), inputs, dy)  # fp64 truth
    f32 = [t.float() for t in inputs]
    ours = _fwd_bwd(lambda *a: ops.gelu_mlp(*a, activation=activation, backend=backend), f32, dy.float())
    # PyTorch's own fp32 error for the same function
    approx = "none" if activation == "gelu" else "tanh"
    base = _fwd_bwd(lambda x, wf, bf, wp, bp: F.linear(F.gelu(F.linear(x, wf, bf), approximate=approx), wp, bp),
                    f32, dy.float())
    names = ["y", "dx", "dw_fc", "db_fc", "dw_proj", "db_proj"]
    for name, o, r, b in zip(names, ours, ref, base):
        assert_error_within(o, r, b, what=f"{backend} {activation} {name}")
    # the check is sensitive to the activation: the other GELU is far outside the tolerance
    other = "gelu_tanh" if activation == "gelu" else "gelu"
    y_other = reference.gelu_mlp(*inputs, activation=other)
    assert (y_other - ref[0]).abs().max() > 100 * (base[0].double() - ref[0]).abs().max() + 1e-4


@pytest.mark.parametrize("activation", ACTS)
def test_native_inference_and_fp64_paths(activation):
    # gelu_mlp_infer (no grad: in place), both row regimes; and fp64 gradcheck of fwd + bwd
    for M in (3, 40):
        inputs = _mlp_inputs(M, 16, 40, 16, seed=M, scale=3.0)
        want = reference.gelu_mlp(*inputs, activation=activation)
        f32 = [t.float() for t in inputs]
        with torch.no_grad():
            got = ops.gelu_mlp(*f32, activation=activation, backend="native")
            base = F.linear(F.gelu(F.linear(f32[0], f32[1], f32[2]),
                                   approximate="none" if activation == "gelu" else "tanh"), f32[3], f32[4])
        assert_error_within(got, want, base, what=f"infer M={M}")
    inputs = [t.requires_grad_() for t in _mlp_inputs(4, 6, 10, 5, seed=3, scale=3.0)]
    assert torch.autograd.gradcheck(lambda *a: ops.gelu_mlp(*a, activation=activation, backend="native"), inputs)
    exact = activation == "gelu"
    x, w_fc, b_fc, w_proj, b_proj = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_infer.default, (x, w_fc, b_fc, w_proj, b_proj, exact))
    y, pre = torch.ops.gptfast.gelu_mlp_fwd(x, w_fc, b_fc, w_proj, b_proj, exact)
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_bwd.default, (torch.randn_like(y), x, w_fc, w_proj, pre, exact))


def test_bad_activation_is_refused():
    x, w_fc, b_fc, w_proj, b_proj = [t.float() for t in _mlp_inputs(2, 4, 8, 4, seed=0)]
    for backend in CPU_BACKENDS:
        with pytest.raises(ValueError, match=r"gelu_mlp: activation must be one of .*got 'relu'"):
            ops.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, activation="relu", backend=backend)
    with pytest.raises(ValueError, match=r"GPTConfig.activation must be one of .*got 'gelu_new'"):
        GPTConfig(activation="gelu_new")
    with pytest.raises(ValueError, match="GPTConfig.activation"):
        GPTConfig.from_preset("tiny", activation="tanh")


def test_config_round_trip_and_old_checkpoints(tmp_path):
    cfg = GPTConfig.from_preset("tiny", activation="gelu")
    assert GPTConfig.from_dict(cfg.to_dict()).activation == "gelu"
    old = cfg.to_dict()
    del old["activation"]  # a config written before the field existed
    assert GPTConfig.from_dict(old).activation == "gelu_tanh"
    # gptfast checkpoints carry it
    from gptfast.io.checkpoint import load_checkpoint, save_checkpoint
    from gptfast.tokenizers import CharTokenizer

    model = GPT(cfg).eval()
    save_checkpoint(tmp_path / "ck", model, CharTokenizer("".join(chr(65 + i) for i in range(65))))
    loaded, _tok, _meta = load_checkpoint(tmp_path / "ck")
    assert loaded.config.activation == "gelu"
    ids = torch.randint(0, 65, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


# ----------------------------------------------------------------------------- nanoGPT


class _NanoCausalSelfAttention(nn.Module):
    """nanoGPT model.py's CausalSelfAttention (flash path), for the reference logits."""

    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _NanoMLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()  # nanoGPT: exact erf GELU
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _NanoLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = _NanoLayerNorm(n_embd, bias)
        self.attn = _NanoCausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = _NanoLayerNorm(n_embd, bias)
        self.mlp = _NanoMLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _NanoGPT(nn.Module):
    """nanoGPT's GPT (https://github.com/karpathy/nanoGPT/blob/master/model.py): same module tree,
    so the same state-dict keys, and tied wte / lm_head. Returns logits at every position."""

    def __init__(self, n_layer, n_head, n_embd, block_size, vocab_size, bias):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(0.0), h=nn.ModuleList([_NanoBlock(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=_NanoLayerNorm(n_embd, bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1])))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


NANO_ARGS = dict(n_layer=2, n_head=3, n_embd=48, block_size=32, bias=True, vocab_size=71, dropout=0.0)


@pytest.fixture(scope="module")
def nano():
    """A trained-scale nanoGPT model: weights scaled so that GELU inputs reach |x| ~ 3-6 (a fresh
    0.02-std init keeps them near 0, where tanh and erf GELU agree to ~1e-5). n_head 3: head dim
    16, which the Triton attention kernel takes."""
    torch.manual_seed(21)
    a = {k: v for k, v in NANO_ARGS.items() if k != "dropout"}
    m = _NanoGPT(**a).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "wte" not in name and "wpe" not in name:
                nn.init.normal_(p, 0.0, 1.0 / math.sqrt(p.shape[1]))
                if "c_fc" in name:
                    p.mul_(3.0)
            elif p.dim() == 1:
                p.normal_(0.0, 0.3).add_(1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") else 0.0)
            else:
                nn.init.normal_(p, 0.0, 0.5)
    seen = []
    hooks = [b.mlp.gelu.register_forward_hook(lambda mod, i, o: seen.append(i[0].abs().max().item()))
             for b in m.transformer.h]
    with torch.no_grad():
        m(torch.randint(0, 71, (2, 32), generator=torch.Generator().manual_seed(22)))
    for h in hooks:
        h.remove()
    assert min(seen) > 3.0, seen  # trained-scale pre-activations
    return m


def _write_nanogpt_ckpt(path, m):
    """Exactly as nanoGPT's train.py saves: torch.compile'd model keys (`_orig_mod.` prefix; the tied
    wte / lm_head appear under both names), model_args, optimizer state, iter_num, best_val_loss,
    config."""
    state = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    torch.save({"model": state, "optimizer": opt.state_dict(), "model_args": dict(NANO_ARGS), "iter_num": 500,
                "best_val_loss": torch.tensor(1.5), "config": {"dataset": "shakespeare_char", "n_layer": 2}}, path)
    # gptfast must read it with weights_only=True (the nanoGPT file itself is tensors + plain data)
    torch.load(path, weights_only=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nanogpt_exact_gelu_checkpoint_logits(nano, tmp_path, backend):
    p = tmp_path / "ckpt.pt"
    _write_nanogpt_ckpt(p, nano)
    model = from_pretrained(p)
    assert model.config.activation == "gelu"
    ids = torch.randint(0, 71, (2, 32), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        want = nano(ids)
        with ops.use_backend(backend):
            got = model(ids)[0]
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{backend}: max |logit diff| {err:.3g}"
    # sensitivity: the same weights with GPT-2's tanh GELU are far off (the bug of issue #21)
    model.config.activation = "gelu_tanh"
    for blk in model.transformer.h:
        blk.mlp.activation = "gelu_tanh"
    with torch.no_grad(), ops.use_backend(backend):
        assert (model(ids)[0] - want).abs().max() > 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_engine_generation_exact_gelu(nano, tmp_path, fused, monkeypatch):
    """KV-cached generation (the native fused step and the Python step) of the imported exact-GELU
    model picks the nanoGPT reference's greedy tokens (argmax of its full forward each step)."""
    p = tmp_path / "ckpt.pt"
    _write_nanogpt_ckpt(p, nano)
    model = from_pretrained(p)
    if not fused:  # the model's own forward for the step
        monkeypatch.setattr(fused_decode, "step_weights", lambda *a, **k: None)
    prompts = [[1, 5, 9], [7, 3, 3, 2, 60]]
    n = 12
    stats: dict = {}
    got, logprobs = gptfast.generate(model, prompts, n, temperature=0, backend="native", stats=stats,
                                     return_logprobs=True)
    assert stats["decode_step"] == ("native fused" if fused else "python"), stats
    for prompt, toks, lps in zip(prompts, got, logprobs):
        seq, want_lps = list(prompt), []
        with torch.no_grad():
            for _ in range(n):
                logits = nano(torch.tensor([seq]))[0, -1]
                top2 = logits.topk(2).values
                assert top2[0] - top2[1] > 1e-4  # no argmax decided by rounding
                seq.append(int(logits.argmax()))
                want_lps.append(torch.log_softmax(logits, -1)[seq[-1]].item())
        assert toks == seq[len(prompt):]
        # the tokens alone rarely tell the GELUs apart; their log-probs do (tanh: off by > 1e-4)
        err = max(abs(a - b) for a, b in zip(lps, want_lps))
        assert err <= 1e-5, f"log-prob error {err:.3g}"


# ----------------------------------------------------------------------------- Hugging Face


ATOL = 1e-5  # fp32 end to end, summation order only (~1e-7 here)


def _hf(activation_function, seed=31):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_positions=32, initializer_range=0.2,
                     activation_function=activation_function, attn_implementation="eager",
                     bos_token_id=96, eos_token_id=96)
    return GPT2LMHeadModel(cfg).eval()


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


IDS = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(32))


@pytest.mark.parametrize("hf_act, ours, written", [
    ("gelu", "gelu", "gelu"), ("gelu_new", "gelu_tanh", "gelu_new"),
    ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"), ("gelu_python", "gelu", "gelu"),
    ("gelu_accurate", "gelu_tanh", "gelu_new"), ("gelu_fast", "gelu_tanh", "gelu_new"),
])
def test_hf_load_and_export(tmp_path, hf_act, ours, written):
    hf = _hf(hf_act)
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert model.config.activation == ours
    want = _hf_logits(hf, IDS)
    backends = CPU_BACKENDS if hf_act in ("gelu", "gelu_new") else ["reference"]
    for backend in backends:
        with torch.no_grad(), ops.use_backend(backend):
            err = (model(IDS)[0] - want).abs().max().item()
        assert err <= ATOL, f"{hf_act} on {backend}: max |logit diff| {err:.3g}"
    # sensitivity: the model has GELU inputs where the two forms differ visibly in the logits
    other = _hf("gelu_new" if ours == "gelu" else "gelu")
    other.load_state_dict(hf.state_dict())
    assert (_hf_logits(other, IDS) - want).abs().max() > 20 * ATOL
    # export: transformers loads what we write, with the matching activation_function
    out = save_pretrained(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["activation_function"] == written
    again = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    err = (_hf_logits(again, IDS) - want).abs().max().item()
    assert err <= ATOL, f"export of {hf_act}: {err:.3g}"


def test_hf_other_activations_refused(tmp_path):
    hf = _hf("gelu")
    hf.config.activation_function = "quick_gelu"
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"activation_function is 'quick_gelu', expected one of"):
        from_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["activation_function"] = ["gelu"]  # not even a name: the same clear refusal
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"activation_function is \['gelu'\], expected one of"):
        from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("hf_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hf_patch_exact_and_tanh(hf_act, backend, monkeypatch):
    hf = _hf(hf_act)
    want = _hf_logits(hf, IDS)
    calls = []
    real = gptfast.hf_patch.ops.gelu_mlp

    def spy(*a, **k):
        calls.append(k.get("activation"))
        return real(*a, **k)

    monkeypatch.setattr(gptfast.hf_patch.ops, "gelu_mlp", spy)
    gptfast.patch(hf, backend=backend)
    try:
        got = _hf_logits(hf, IDS)
    finally:
        gptfast.unpatch(hf)
    assert calls == [{"gelu": "gelu", "gelu_new": "gelu_tanh"}[hf_act]] * 2  # both MLPs patched
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"patched {hf_act} on {backend}: max |logit diff| {err:.3g}"
