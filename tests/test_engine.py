"""KV-cached generation (gptfast.generation: the model's own forward with its static KV cache): equivalence with the no-cache reference
(`generate_reference`, and independent loops written here), batching, seeds, streaming, stop
tokens, log-probs, the repetition penalty, the block-size overflow modes and the CLI."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast import GPT, GPTConfig, generation
from gptfast.sampling import apply_repetition_penalty
from gptfast.io.checkpoint import DEFAULT_MODEL_DIR, META_NAME
from gptfast.generation import generate_reference


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Correctness tests run single-threaded: on a shared, oversubscribed 2-core machine OpenMP's
    barriers make tiny multi-threaded ops up to 40x slower (measured: 30 s vs 0.8 s for a
    100-token reference run). Speed is measured by `gptfast.bench.generate`, not here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(preset: str, backend: str = "torch", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, dropout=0.0, **overrides), backend=backend).eval()


@pytest.fixture(scope="module")
def char_model():
    # Random shakespeare-char shape (block 128): 200 new tokens cross the block size.
    return _model("shakespeare-char")


@pytest.fixture(scope="module")
def gpt2_small():
    # GPT-2 vocabulary and width, fewer layers (and a short block so sliding is exercised fast).
    return _model("gpt2", n_layer=2, block_size=32)


@pytest.fixture(scope="module")
def tiny():
    return _model("tiny", block_size=16)


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = (a != b).nonzero()
    return f"first differences at {bad[:5].tolist()}" if len(bad) else "equal"


# ----------------------------------------------------------------------------- greedy == reference


@pytest.mark.parametrize("backend", ["torch", "reference", "native", "auto"])
def test_greedy_matches_reference_char_200_tokens(char_model, backend):
    char_model.backend = backend
    try:
        idx = torch.tensor([[0, 20, 47, 56, 57, 58, 1]])
        want = generate_reference(char_model, idx, 200, temperature=0.0)
        stats: dict = {}
        got = char_model.generate(idx, 200, temperature=0.0, stats=stats)
    finally:
        char_model.backend = "torch"
    assert torch.equal(got, want), _first_diff(got, want)
    # native on CPU (and auto, which picks it here) decodes with the fused one-op step
    if backend in ("native", "auto") and stats["backends"]["decode_attention"] == "native":
        assert stats["decode_step"] == "native fused"


def test_native_fused_step_gpt2_shape_batched_and_above_its_batch_limit():
    """gpt2 vocabulary / width on the native backend: the fused step for B <= 16 rows, the Python
    step above; both give each row the reference's tokens (prompts of different lengths, sliding)."""
    model = _model("gpt2", backend="native", n_layer=2, block_size=32)
    prompts = [[464, 3290, 318], [257, 1332, 11, 290, 262, 2068, 7586], [3290]]
    stats: dict = {}
    got = gptfast.generate(model, prompts, 33, temperature=0.0, stats=stats)  # crosses block 32
    assert stats["decode_step"] == "native fused"
    for p, row in zip(prompts, got):
        want = generate_reference(model, torch.tensor([p]), 33, temperature=0.0)
        assert row == want[0, len(p):].tolist(), p
    stats = {}
    big = gptfast.generate(model, (prompts * 6)[:17], 8, temperature=0.0, stats=stats)
    assert stats["decode_step"] == "python"
    assert big == [row[:8] for row in (got * 6)[:17]]


def _bf16_rounded(model: GPT) -> GPT:
    """A copy whose matrices (and the tied wte / LM head) hold bf16 values in fp32: what
    quantize(model, 'bf16') computes with. wpe, biases and LayerNorm stay as they are (fp32)."""
    r = GPT(model.config, backend=model.backend)
    r.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in r.named_parameters():
            if p.dim() == 2 and "wpe" not in name:
                p.copy_(p.bfloat16().float())
    return r.eval()


@pytest.mark.parametrize("preset,overrides,n", [("shakespeare-char", {}, 200),
                                                ("gpt2", dict(n_layer=2, block_size=32), 33)])
def test_weight_only_bf16_equals_reference_on_rounded_weights(preset, overrides, n):
    """quantize(model, 'bf16') widens each bf16 weight exactly and does fp32 math, so it generates
    what the reference generates with the weights rounded to bf16 (batched, different lengths,
    sliding), on the fused native step and on the model's forward through every other backend."""
    model = _model(preset, backend="native", **overrides)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    n_mat = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "wpe" not in name)
    q = gptfast.quantize(copy.deepcopy(model), "bf16")
    held = {t.data_ptr(): t for t in q.buffers() if t.dtype == torch.bfloat16}
    assert sum(t.numel() * 2 for t in held.values()) == 2 * n_mat  # each matrix once in bf16, the tied head once
    stats: dict = {}
    got = gptfast.generate(q, prompts, n, temperature=0.0, stats=stats)
    assert stats["decode_step"] == "native fused" and stats["weight_format"] == "bf16"
    stats = {}
    assert gptfast.generate(q, prompts, n, temperature=0.0, backend="torch", stats=stats) == got
    assert stats["decode_step"] == "python"
    rounded = _bf16_rounded(model)
    for p, row in zip(prompts, got):
        want = generate_reference(rounded, torch.tensor([p]), n, temperature=0.0)
        assert row == want[0, len(p):].tolist(), _first_diff(torch.tensor([row]), want[:, len(p):])


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bf16_swap_is_the_model_on_rounded_weights(backend):
    """quantize(model, 'bf16') holds every matrix and the tied embedding in bf16 (one tensor for
    wte and the head) and its forward is the fp32 model's on bf16-rounded weights, exactly."""
    model = _model("gpt2", backend=backend, n_layer=2, block_size=32)
    q = gptfast.quantize(copy.deepcopy(model), "bf16")
    assert q.transformer.wte.weight is q.lm_head.weight and q.lm_head.weight.dtype == torch.bfloat16
    for blk in q.transformer.h:
        for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            assert lin.weight.dtype == torch.bfloat16 and lin.bias.dtype == torch.float32
    assert q.transformer.wpe.weight.dtype == torch.float32 and q.dtype == torch.float32
    idx = torch.tensor([[464, 3290, 318, 257, 1332], [11, 290, 262, 2068, 7586]])
    with torch.no_grad():
        assert torch.equal(q(idx)[0], _bf16_rounded(model)(idx)[0])


def test_weight_only_bf16_accuracy_on_the_shipped_model(shakespeare_path):
    """bf16 weights cost the shipped model < 0.5 % validation perplexity (measured: 4.6114 -> 4.6113
    on the first 20k characters of the validation split, i.e. nothing beyond noise)."""
    from gptfast.io.checkpoint import default_model
    from gptfast.perplexity import sliding_window_perplexity

    model, tok = default_model()
    model.eval()
    text = shakespeare_path.read_text()
    ids = tok.encode(text[int(0.9 * len(text)):][:6000])
    p32, _ = sliding_window_perplexity(model, ids)
    p16, _ = sliding_window_perplexity(_bf16_rounded(model), ids)
    assert abs(p16 / p32 - 1) < 0.005, (p32, p16)


def test_greedy_matches_reference_gpt2_shape(gpt2_small):
    idx = torch.tensor([[464, 3290, 318, 257, 1332]])
    want = generate_reference(gpt2_small, idx, 40, temperature=0.0)  # crosses block 32
    got = gptfast.generate(gpt2_small, idx, 40, temperature=0.0)
    assert got[0] == want[0, 5:].tolist(), _first_diff(torch.tensor([got[0]]), want[:, 5:])


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / META_NAME).exists(), reason="no shipped shakespeare_char model yet")
def test_greedy_matches_reference_shipped_model():
    from gptfast.io.checkpoint import default_model

    model, tok = default_model()
    model.eval()
    idx = torch.tensor([tok.encode("ROMEO:\n")])
    want = generate_reference(model, idx, 200, temperature=0.0)
    got = model.generate(idx, 200, temperature=0.0)
    assert torch.equal(got, want), _first_diff(got, want)


def test_greedy_matches_an_independent_loop(tiny):
    """Not only the reference: a plain loop over the model's own forward, cropped to the block."""
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    ref = idx.clone()
    for _ in range(30):
        logits, _ = tiny(ref[:, -16:])
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tiny.generate(idx, 30, temperature=0.0), ref)


# ----------------------------------------------------------------------------- batching and seeds


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18]]


def test_batched_equals_one_by_one_greedy(char_model):
    batched = gptfast.generate(char_model, PROMPTS, 40, temperature=0.0)
    single = [gptfast.generate(char_model, [p], 40, temperature=0.0)[0] for p in PROMPTS]
    assert batched == single
    # ...and each row equals the reference run on that prompt alone
    for p, row in zip(PROMPTS, batched):
        ref = generate_reference(char_model, torch.tensor([p]), 40, temperature=0.0)
        assert row == ref[0, len(p):].tolist()


@pytest.mark.parametrize("top_k,top_p", [(None, None), (10, None), (None, 0.9), (20, 0.8)])
def test_batched_equals_one_by_one_seeded_sampling(char_model, top_k, top_p):
    seeds = [11, 22, 33, 44]
    kw = dict(temperature=0.9, top_k=top_k, top_p=top_p)
    batched = gptfast.generate(char_model, PROMPTS, 30, seed=seeds, **kw)
    single = [gptfast.generate(char_model, [p], 30, seed=[s], **kw)[0] for p, s in zip(PROMPTS, seeds)]
    assert batched == single
    # one prompt with an int seed is the same generator as a one-element seed list
    assert gptfast.generate(char_model, [PROMPTS[0]], 30, seed=11, **kw)[0] == single[0]


def test_batched_different_lengths_beyond_block(tiny):
    prompts = [[1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], list(range(20))]  # last > block 16
    batched = gptfast.generate(tiny, prompts, 25, temperature=0.0)
    for p, row in zip(prompts, batched):
        ref = generate_reference(tiny, torch.tensor([p]), 25, temperature=0.0)
        assert row == ref[0, len(p):].tolist()


def test_seeded_sampling_reproducible_and_matches_reference(char_model):
    idx = torch.tensor([[5, 6, 7], [8, 9, 10]])
    a = char_model.generate(idx, 50, temperature=1.0, top_k=30, seed=7)
    b = char_model.generate(idx, 50, temperature=1.0, top_k=30, seed=7)
    c = char_model.generate(idx, 50, temperature=1.0, top_k=30, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # an int seed is one generator for the batch, drawn as the reference draws it
    ref = generate_reference(char_model, idx, 50, temperature=1.0, top_k=30, seed=7)
    assert torch.equal(a, ref), _first_diff(a, ref)


def test_streaming_yields_the_same_tokens(char_model):
    kw = dict(temperature=0.8, top_p=0.95, seed=[1, 2, 3, 4], eot_token=0)
    rows = gptfast.generate(char_model, PROMPTS, 40, **kw)
    streamed = [[] for _ in PROMPTS]
    n_steps = 0
    for step in gptfast.stream(char_model, PROMPTS, 40, **kw):
        n_steps += 1
        for i, t in enumerate(step.tokens):
            if t is not None:
                streamed[i].append(t)
    assert streamed == rows
    assert n_steps == max(len(r) for r in rows)


# ----------------------------------------------------------------------------- stopping


def test_eot_stops_a_row_and_max_lengths_per_row(char_model):
    greedy = gptfast.generate(char_model, PROMPTS, 20, temperature=0.0)
    eot = greedy[1][4]  # row 1 stops at its 5th token (or earlier if that token came before)
    got = gptfast.generate(char_model, PROMPTS, 20, temperature=0.0, eot_token=eot)
    for g, full in zip(got, greedy):
        stop = full.index(eot) + 1 if eot in full else len(full)
        assert g == full[:stop]
    assert len(got[1]) <= 5
    lens = [3, 0, 7, 1]
    got = gptfast.generate(char_model, PROMPTS, lens, temperature=0.0)
    assert got == [full[:n] for full, n in zip(greedy, lens)]


def test_model_generate_pads_finished_rows_like_reference(char_model):
    idx = torch.tensor([[1, 2, 3], [3, 2, 1]])
    greedy = generate_reference(char_model, idx, 15, temperature=0.0)
    eot = int(greedy[0, 5])
    want = generate_reference(char_model, idx, 15, temperature=0.0, eot_token=eot)
    got = char_model.generate(idx, 15, temperature=0.0, eot_token=eot)
    assert torch.equal(got, want), _first_diff(got, want)


# ----------------------------------------------------------------------------- log-probs, penalty


@torch.no_grad()
def _independent_loop(model, prompt, n, penalty, temperature):
    """No cache, no engine: full forward, CTRL penalty by hand, greedy; log-probs by hand."""
    seq = list(prompt)
    toks, lps = [], []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0][0, -1].double()
        for t in set(seq):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        t = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits / temperature, -1)[t]))
        toks.append(t)
        seq.append(t)
    return toks, lps


def test_logprobs_and_repetition_penalty_match_a_direct_computation(char_model):
    prompt = [20, 47, 56, 57, 1, 20, 47]
    toks, lps = gptfast.generate(char_model, [prompt], 30, temperature=0.0, repetition_penalty=1.3,
                                 return_logprobs=True)
    want_t, want_lp = _independent_loop(char_model, prompt, 30, 1.3, 1.0)
    assert toks[0] == want_t
    assert torch.allclose(torch.tensor(lps[0]), torch.tensor(want_lp, dtype=torch.float32), atol=1e-4)
    assert not gptfast.generate(char_model, [prompt], 30, temperature=0.0) == toks  # penalty had an effect


@torch.no_grad()
def test_logprobs_use_temperature_not_truncation(char_model):
    prompt = [1, 2, 3]
    toks, lps = gptfast.generate(char_model, [prompt], 10, temperature=0.7, top_k=5, seed=3,
                                 return_logprobs=True)
    seq = list(prompt)
    for t, lp in zip(toks[0], lps[0]):
        logits = char_model(torch.tensor([seq]))[0][0, -1]
        assert abs(float(torch.log_softmax(logits / 0.7, -1)[t]) - lp) < 1e-4
        seq.append(t)


def test_repetition_penalty_equals_hugging_face_processor():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[torch.arange(3).unsqueeze(1), ids] = True
    want = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7), want)


# ----------------------------------------------------------------------------- block size overflow


def test_overflow_error_names_the_numbers(tiny):
    with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 8 needs 17 .*block_size 16"):
        gptfast.generate(tiny, [[1] * 10], 8, overflow="error")
    assert len(gptfast.generate(tiny, [[1] * 10], 7, overflow="error", temperature=0.0)[0]) == 7
    with pytest.raises(ValueError, match="overflow"):
        gptfast.generate(tiny, [[1]], 3, overflow="roll")


def test_overflow_slide_equals_reference_sampled(tiny):
    idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    want = generate_reference(tiny, idx, 40, temperature=1.0, seed=5)
    got = tiny.generate(idx, 40, temperature=1.0, seed=5, overflow="slide")
    assert torch.equal(got, want), _first_diff(got, want)


# ----------------------------------------------------------------------------- weights, dtype, args


def test_generation_follows_parameter_updates():
    m = _model("tiny", seed=3)
    idx = torch.tensor([[1, 2, 3]])
    m.generate(idx, 5, temperature=0.0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)  # in place: same storage, bumped version
    assert torch.equal(m.generate(idx, 20, temperature=0.0), generate_reference(m, idx, 20, temperature=0.0))
    m.load_state_dict(_model("tiny", seed=4).state_dict())
    assert torch.equal(m.generate(idx, 20, temperature=0.0), generate_reference(m, idx, 20, temperature=0.0))


def test_bf16_logit_error_within_twice_plain_bf16(gpt2_small):
    """generate(dtype='bf16') on an fp32 model: the cached prompt pass's next-token logits vs fp32
    must be at most 2x as far off as the model itself cast to bf16 (FlashAttention's rule)."""
    prompt = [[464, 3290, 318, 257, 1332, 11, 290]]
    m32, _ = generation._in_dtype(gpt2_small, torch.float32)
    m16, nbytes = generation._in_dtype(gpt2_small, torch.bfloat16)
    assert m32 is gpt2_small and m16.dtype == torch.bfloat16 and nbytes > 0

    def logits(m):
        m.setup_caches(1, 16)
        try:
            with torch.inference_mode():
                return generation.prefill(m, torch.tensor(prompt), torch.tensor([7]))
        finally:
            m.clear_caches()

    ref = logits(m32)
    got = logits(m16)
    plain = GPT(gpt2_small.config, backend="torch")
    plain.load_state_dict(gpt2_small.state_dict())
    plain = plain.to(torch.bfloat16).eval()
    with torch.no_grad():
        base = plain(torch.tensor(prompt))[0][:, -1].float()
    err, base_err = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-3, (err, base_err)
    # the copy is cached per model (one dtype at a time): asking again returns the same object
    assert generation._in_dtype(gpt2_small, torch.bfloat16)[0] is m16


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        gptfast.generate(tiny, [[1], []], 3)
    with pytest.raises(ValueError, match="outside"):
        gptfast.generate(tiny, [[1, 99]], 3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        gptfast.generate(tiny, [[1]], 3, repetition_penalty=0)
    with pytest.raises(ValueError, match="top_p"):
        gptfast.generate(tiny, [[1]], 3, top_p=1.5)
    with pytest.raises(ValueError, match="seed list"):
        gptfast.generate(tiny, [[1], [2]], 3, seed=[1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gptfast.generate(tiny, [[1]], -1)
    with pytest.raises(ValueError, match="dtype"):
        gptfast.generate(tiny, [[1]], 1, dtype="int8")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['weight_dtype'\]"):
        gptfast.generate(tiny, [[1]], 1, weight_dtype="bf16")
    with pytest.raises(ValueError, match="pass sampling settings either as `sampling=` or as keywords"):
        gptfast.generate(tiny, [[1]], 1, generation.SamplingParams(), top_k=3)
    with pytest.raises(ValueError, match=r"quantize: fmt must be one of \('bf16', 'int8', .*\), got 'int3'"):
        gptfast.quantize(copy.deepcopy(tiny), "int3")
    with pytest.raises(ValueError, match=r"quantize: 'bf16' weights keep fp32 activations; the model's dtype is torch.float64"):
        gptfast.quantize(copy.deepcopy(tiny).double(), "bf16")
    with pytest.raises(ValueError, match=r"dtype=torch.float64 on a model whose weights are in format 'bf16'"):
        gptfast.generate(gptfast.quantize(copy.deepcopy(tiny), "bf16"), [[1]], 1, dtype=torch.float64)
    assert gptfast.generate(tiny, [[1], [2]], 0) == [[], []]


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(tiny):
    """torch.compile of decode_one_token on CPU (inductor) gives the eager tokens."""
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    want = gptfast.generate(tiny, idx, 10, temperature=0.0)
    assert gptfast.generate(tiny, idx, 10, temperature=0.0, compile=True) == want


# ----------------------------------------------------------------------------- CLI


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gptfast.cli", "generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_cli_streams_and_reports_speed(tmp_path):
    from gptfast.cli import main

    f = tmp_path / "p.txt"
    f.write_text("To be")
    args = ["--preset", "tiny", "--max-new-tokens", "6", "--temperature", "0", "--backend", "torch"]
    proc = _cli("--prompt-file", str(f), *args)
    assert proc.returncode == 0, proc.stderr
    model = _model("tiny", backend="torch")  # the CLI's preset model: seed 0
    from gptfast.io.checkpoint import default_tokenizer

    tok = default_tokenizer()
    want = generate_reference(model, torch.tensor([tok.encode("To be")]), 6, temperature=0.0)
    assert proc.stdout == tok.decode(want[0].tolist()) + "\n"
    assert "tokens/s" in proc.stderr and "ms/token" in proc.stderr and "peak RSS" in proc.stderr
    proc2 = _cli("--prompt", "-", *args, stdin="To be")
    assert proc2.returncode == 0 and proc2.stdout == proc.stdout
    assert main(["generate", *args, "--prompt", "To be", "--num-samples", "2", "--seed", "1"]) == 0
    # weight-only bf16 on the native kernels: the reference's tokens with bf16-rounded matrices
    nat = [a if a != "torch" else "native" for a in args]
    proc3 = _cli("--prompt", "To be", *nat, "--quantize", "bf16")
    assert proc3.returncode == 0, proc3.stderr
    want16 = generate_reference(_bf16_rounded(_model("tiny", backend="native")), torch.tensor([tok.encode("To be")]),
                                6, temperature=0.0)
    assert proc3.stdout == tok.decode(want16[0].tolist()) + "\n"
    assert "weights bf16" in proc3.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--num-samples", "0"], "--num-samples"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--max-new-tokens", "200", "--overflow", "error"], "block_size"),
    (["--quantize", "bf16", "--dtype", "bf16"], "--quantize bf16 (bf16 weights, fp32 math) needs --dtype fp32"),
])
def test_cli_errors_are_one_line(flags, needle, capsys):
    from gptfast.cli import main

    assert main(["generate", "--preset", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("gptfast: error")]
    assert len(lines) == 1 and needle in lines[0], err


def test_dtype_copy_follows_the_models_backend(tiny):
    """generate(dtype=...) runs a cached copy of the model in that dtype; a backend chosen on the
    model after the copy was made still applies to it."""
    m = _model("tiny", backend="torch", block_size=16)
    stats: dict = {}
    gptfast.generate(m, [[1, 2]], 2, temperature=0.0, dtype="fp16", stats=stats)
    assert set(stats["backends"].values()) == {"torch"}, stats["backends"]
    m.backend = "reference"
    stats = {}
    gptfast.generate(m, [[1, 2]], 2, temperature=0.0, dtype="fp16", stats=stats)
    assert set(stats["backends"].values()) == {"reference"}, stats["backends"]
