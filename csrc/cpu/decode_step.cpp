// One GPT-2 decoding step on CPU as a single op: tokens (B,) at positions pos (B,) -> logits (B, V).
//
// Why: batch-1 decoding of GPT-2 124M streams ~500 MB of weights per token and does almost no
// other work, so everything that is not a weight stream is overhead to remove. Run from Python,
// one step is ~110 op calls (12 layers x LayerNorm, QKV, cache writes, attention, projections,
// MLP, residual adds) plus their Python: ~2 ms per token measured on this project's 2-core VM,
// ~7 % of a 28 ms step. This op runs the same forward from C++, calling the other ops' C++ entry
// points directly (cpu_ops.h, skinny_linear.h): no Python, no dispatcher, no autograd bookkeeping
// between kernels. It is the CPU counterpart of what gpt-fast does on GPU by capturing the step
// in a CUDA graph (github.com/pytorch-labs/gpt-fast, generate.py: decode_one_token under
// torch.compile(mode="reduce-overhead")).
//
// The computation is exactly the model's decode forward with the native backend (same kernels,
// same order: embedding + position, then per block ln_1 -> c_attn -> write K/V at each row's own
// position -> decode attention over positions 0..pos[b] -> c_proj + residual -> ln_2 -> GELU-MLP +
// residual (exact_gelu: the erf GELU, else the tanh one), then ln_f and the LM head), so the two
// agree to the last bit (tests/test_decode_step_abi.py checks it against the public ops).
//
// Weights come by name: one list per kind (ln1_w, w_qkv, ...), one entry per block, so no caller
// keeps slot positions in agreement (the Python side: gptfast.ops.native.DecodeStepWeights).
// Quantized weights (issue #20, gptfast.quantize's QuantLinear / QuantEmbedding): the block matrices
// may be quantized_linear qweights of one format (bits, group_size) with per-layer scales / zeros, the
// head in its own format, the token embedding too (wte_bits: rows dequantized as QuantEmbedding does);
// the MLP is then c_fc -> at::gelu -> c_proj, as the model's MLP runs on quantized linears. act_int8
// (int8 activations) applies to the int8 matrices, as the native wrapper does.
// Weights are nn.Linear's (out, in) layout, used in place. Matrices may be fp32 or bf16
// (weight-only bf16: half the bytes streamed; every product widened exactly and accumulated in
// fp32). Activations, LayerNorm parameters, biases, wpe and the KV cache are fp32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "cpu_ops.h"
#include "quant_linear.h"
#include "skinny_linear.h"

namespace gptfast {
namespace {

constexpr const char* kOp = "decode_step";

// A weight matrix of block `layer`, named by its list (`w_qkv`, ...). rows < 0: any (F). bits != 0: a
// quantized matrix (int8 (rows, cols) / packed uint8 (rows, cols / 2)), its dtype and layout checked
// by quantized_linear.
void check_matrix(const at::Tensor& t, int64_t layer, const char* name, int64_t rows, int64_t cols, int64_t bits) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": layer ", layer, " ", name, " must be a CPU tensor, got device ",
              t.device());
  if (bits != 0) {
    TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) * (8 / bits) == cols, kOp, ": layer ",
                layer, " ", name, " must be a quantized matrix of shape (", rows < 0 ? std::string("F") : std::to_string(rows),
                ", ", cols, " / ", 8 / bits, ") for bits = ", bits, ", got ", t.sizes());
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, kOp, ": layer ", layer, " ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == cols, kOp, ": layer ", layer, " ",
              name, " must have shape (", rows < 0 ? std::string("F") : std::to_string(rows), ", ", cols, "), got ",
              t.sizes());
}

// A vector parameter (LayerNorm weight / bias, a bias) or None. `layer` < 0: not a block's (ln_f).
// The name is only formatted on failure (TORCH_CHECK evaluates its message lazily): this runs for
// every block on every step.
void check_vector(const c10::optional<at::Tensor>& t, int64_t layer, const char* name, int64_t n) {
  if (!t.has_value()) return;
  auto where = [&] { return layer < 0 ? std::string(name) : "layer " + std::to_string(layer) + " " + name; };
  TORCH_CHECK(t->device().is_cpu(), kOp, ": ", where(), " must be a CPU tensor, got device ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, kOp, ": ", where(), " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, kOp, ": ", where(), " must have shape (", n, "), got ", t->sizes());
}

// Every per-layer list holds one entry per block (k_cache's length).
void check_len(const char* name, size_t got, int64_t L) {
  TORCH_CHECK(static_cast<int64_t>(got) == L, kOp, ": ", name, " must hold one entry per layer (", L,
              ", the length of k_cache), got ", got);
}

// K and V of every row (qkv (B, 3C) = [q | k | v], head h at h*D) into the caches (B, H, T_max, D),
// contiguous, at each row's own position.
void write_kv(const at::Tensor& qkv, at::Tensor& kc, at::Tensor& vc, const int64_t* pos) {
  const int64_t B = kc.size(0), H = kc.size(1), T_max = kc.size(2), D = kc.size(3), C = H * D;
  const float* src = qkv.data_ptr<float>();
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t dst = ((b * H + h) * T_max + pos[b]) * D;
      std::memcpy(kp + dst, src + b * 3 * C + C + h * D, D * sizeof(float));
      std::memcpy(vp + dst, src + b * 3 * C + 2 * C + h * D, D * sizeof(float));
    }
  }
}

using OptList = c10::List<c10::optional<at::Tensor>>;

}  // namespace

at::Tensor decode_step(const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& wte, const at::Tensor& wpe,
                       const OptList& ln1_w, const OptList& ln1_b, at::TensorList w_qkv, const OptList& b_qkv,
                       at::TensorList w_o, const OptList& b_o, const OptList& ln2_w, const OptList& ln2_b,
                       at::TensorList w_fc, const OptList& b_fc, at::TensorList w_proj, const OptList& b_proj,
                       const c10::optional<at::Tensor>& lnf_w, const c10::optional<at::Tensor>& lnf_b,
                       const at::Tensor& w_head, at::TensorList k_cache, at::TensorList v_cache, const OptList& s_qkv,
                       const OptList& z_qkv, const OptList& s_o, const OptList& z_o, const OptList& s_fc,
                       const OptList& z_fc, const OptList& s_proj, const OptList& z_proj,
                       const c10::optional<at::Tensor>& s_head, const c10::optional<at::Tensor>& z_head,
                       const c10::optional<at::Tensor>& s_wte, const c10::optional<at::Tensor>& z_wte, double eps,
                       bool exact_gelu, int64_t bits, int64_t group_size, int64_t head_bits, int64_t head_group_size,
                       int64_t wte_bits, int64_t wte_group_size, bool act_int8) {
  // ---- inputs: every one checked here, before anything is written to the caches
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1, kOp,
              ": tokens must be a 1-D int64 CPU tensor (B,), got ", tokens.scalar_type(), " ", tokens.sizes(), " on ",
              tokens.device());
  const int64_t B = tokens.size(0);
  TORCH_CHECK(B >= 1, kOp, ": tokens must hold at least one row, got shape ", tokens.sizes());
  TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == B, kOp,
              ": pos must be a 1-D int64 CPU tensor of shape (", B, "), got ", pos.scalar_type(), " ", pos.sizes(),
              " on ", pos.device());
  TORCH_CHECK(wte_bits == 0 || wte_bits == 8 || wte_bits == 4, kOp,
              ": wte_bits must be 0 (a float wte), 8 or 4, got ", wte_bits);
  TORCH_CHECK(wte_bits == 0 ? !s_wte.has_value() && !z_wte.has_value() : s_wte.has_value(), kOp,
              wte_bits == 0 ? ": s_wte and z_wte must be None when wte_bits = 0 (a float wte)"
                            : ": s_wte must be a tensor when wte_bits != 0");
  TORCH_CHECK(wte.device().is_cpu() && wte.dim() == 2 &&
                  (wte_bits != 0 || wte.scalar_type() == at::kFloat || wte.scalar_type() == at::kBFloat16),
              kOp, ": wte must be a 2-D float32 or bfloat16 CPU tensor (V, C) (or a quantized matrix with wte_bits), got ",
              wte.scalar_type(), " ", wte.sizes(), " on ", wte.device());
  const int64_t C = wte_bits == 0 ? wte.size(1) : wte.size(1) * (8 / wte_bits);
  if (wte_bits != 0) {  // a quantized token embedding (e.g. the quantized LM head's matrix, tied)
    try {
      quantized_linear(at::empty({0, C}, wpe.options()), wte, *s_wte, z_wte, c10::nullopt, wte_bits, wte_group_size,
                       false);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, kOp, ": wte / s_wte / z_wte: ", e.what_without_backtrace());
    }
  }
  TORCH_CHECK(wpe.device().is_cpu() && wpe.scalar_type() == at::kFloat && wpe.dim() == 2 && wpe.size(1) == C, kOp,
              ": wpe must be a float32 CPU tensor of shape (block_size, ", C, "), got ", wpe.scalar_type(), " ",
              wpe.sizes(), " on ", wpe.device());
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(static_cast<int64_t>(v_cache.size()) == L, kOp, ": k_cache and v_cache must hold one tensor per layer "
              "each, got ", L, " and ", v_cache.size());
  check_len("ln1_w", ln1_w.size(), L);
  check_len("ln1_b", ln1_b.size(), L);
  check_len("w_qkv", w_qkv.size(), L);
  check_len("b_qkv", b_qkv.size(), L);
  check_len("w_o", w_o.size(), L);
  check_len("b_o", b_o.size(), L);
  check_len("ln2_w", ln2_w.size(), L);
  check_len("ln2_b", ln2_b.size(), L);
  check_len("w_fc", w_fc.size(), L);
  check_len("b_fc", b_fc.size(), L);
  check_len("w_proj", w_proj.size(), L);
  check_len("b_proj", b_proj.size(), L);
  // Quantized matrices (bits 8 / 4): every block's four linears in one format, scales (and zeros)
  // one per layer; bits 0: none (the scale / zero lists empty). The head has its own format.
  TORCH_CHECK(bits == 0 || bits == 8 || bits == 4, kOp, ": bits must be 0 (float matrices), 8 or 4, got ", bits);
  TORCH_CHECK(head_bits == 0 || head_bits == 8 || head_bits == 4, kOp,
              ": head_bits must be 0 (a float w_head), 8 or 4, got ", head_bits);
  for (const auto& [name, lst] : {std::pair<const char*, const OptList&>{"s_qkv", s_qkv}, {"s_o", s_o},
                                  {"s_fc", s_fc}, {"s_proj", s_proj}, {"z_qkv", z_qkv}, {"z_o", z_o},
                                  {"z_fc", z_fc}, {"z_proj", z_proj}}) {
    if (bits == 0) {
      TORCH_CHECK(lst.size() == 0, kOp, ": ", name, " must be empty when bits = 0 (float matrices), got ",
                  lst.size(), " entries");
    } else if (name[0] == 's' || lst.size() != 0) {  // zeros: empty = none
      check_len(name, lst.size(), L);
    }
    if (bits != 0 && name[0] == 's')
      for (int64_t l = 0; l < L; ++l)
        TORCH_CHECK(lst.get(l).has_value(), kOp, ": layer ", l, " ", name, " must be a tensor (bits = ", bits,
                    "), got None");
  }
  TORCH_CHECK(head_bits == 0 ? !s_head.has_value() && !z_head.has_value() : s_head.has_value(), kOp,
              head_bits == 0 ? ": s_head and z_head must be None when head_bits = 0 (a float w_head)"
                             : ": s_head must be a tensor when head_bits != 0");
  int64_t H = 0, T_max = 0, D = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache[l]},
                                  {"v_cache", v_cache[l]}}) {
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.is_contiguous(), kOp, ": ",
                  name, "[", l, "] must be a contiguous 4-D float32 CPU tensor (B, H, T_max, D), got ",
                  t.scalar_type(), " ", t.sizes(), " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
      if (H == 0) {
        H = t.size(1), T_max = t.size(2), D = t.size(3);
        TORCH_CHECK(t.size(0) == B && H >= 1 && D >= 1 && H * D == C && T_max >= 1, kOp, ": ", name, "[", l,
                    "] must have shape (", B, ", H, T_max, D) with H * D = C = ", C, ", got ", t.sizes());
      }
      TORCH_CHECK(t.size(0) == B && t.size(1) == H && t.size(2) == T_max && t.size(3) == D, kOp, ": ", name, "[", l,
                  "] must have shape (", B, ", ", H, ", ", T_max, ", ", D, ") like k_cache[0], got ", t.sizes());
    }
  }
  const at::Tensor tok = tokens.contiguous(), ps = pos.contiguous();
  const int64_t* tp = tok.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  const int64_t T_lim = L > 0 ? std::min(T_max, wpe.size(0)) : wpe.size(0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tp[b] >= 0 && tp[b] < wte.size(0), kOp, ": tokens[", b, "] must be in [0, ", wte.size(0), "), got ",
                tp[b]);
    TORCH_CHECK(pp[b] >= 0 && pp[b] < T_lim, kOp, ": pos[", b, "] must be in [0, ", T_lim,
                ") (the cache length and the position table), got ", pp[b]);
  }
  for (int64_t l = 0; l < L; ++l) {
    check_vector(ln1_w.get(l), l, "ln1_w", C);
    check_vector(ln1_b.get(l), l, "ln1_b", C);
    check_matrix(w_qkv[l], l, "w_qkv", 3 * C, C, bits);
    check_vector(b_qkv.get(l), l, "b_qkv", 3 * C);
    check_matrix(w_o[l], l, "w_o", C, C, bits);
    check_vector(b_o.get(l), l, "b_o", C);
    check_vector(ln2_w.get(l), l, "ln2_w", C);
    check_vector(ln2_b.get(l), l, "ln2_b", C);
    check_matrix(w_fc[l], l, "w_fc", -1, C, bits);
    const int64_t F = w_fc[l].size(0);
    check_vector(b_fc.get(l), l, "b_fc", F);
    check_matrix(w_proj[l], l, "w_proj", C, F, bits);
    check_vector(b_proj.get(l), l, "b_proj", C);
    TORCH_CHECK(w_fc[l].scalar_type() == w_proj[l].scalar_type(), kOp, ": layer ", l,
                " w_fc and w_proj must have the same dtype, got ", w_fc[l].scalar_type(), " and ",
                w_proj[l].scalar_type());
    // Scales / zeros: their shapes and dtypes are checked by quantized_linear (errors name scale /
    // zero, this message names the layer): checked here on a zero-row x, before any cache is written.
    if (bits != 0) {
      const std::pair<const char*, const at::Tensor*> mats[] = {{"qkv", &w_qkv[l]}, {"o", &w_o[l]},
                                                                 {"fc", &w_fc[l]}, {"proj", &w_proj[l]}};
      const OptList* ss[] = {&s_qkv, &s_o, &s_fc, &s_proj};
      const OptList* zs[] = {&z_qkv, &z_o, &z_fc, &z_proj};
      for (int i = 0; i < 4; ++i) {
        const at::Tensor& q = *mats[i].second;
        const c10::optional<at::Tensor> z = zs[i]->size() ? zs[i]->get(l) : c10::nullopt;
        try {
          quantized_linear(at::empty({0, q.size(1) * (8 / bits)}, wpe.options()), q, *ss[i]->get(l), z,
                           c10::nullopt, bits, group_size, act_int8 && bits == 8);
        } catch (const c10::Error& e) {
          TORCH_CHECK(false, kOp, ": layer ", l, " w_", mats[i].first, " / s_", mats[i].first, " / z_",
                      mats[i].first, ": ", e.what_without_backtrace());
        }
      }
    }
  }
  check_vector(lnf_w, -1, "lnf_w", C);
  check_vector(lnf_b, -1, "lnf_b", C);
  if (head_bits == 0) {
    TORCH_CHECK(w_head.device().is_cpu() && w_head.dim() == 2 && w_head.size(1) == C &&
                    (w_head.scalar_type() == at::kFloat || w_head.scalar_type() == at::kBFloat16),
                kOp, ": w_head must be a float32 or bfloat16 CPU tensor of shape (V, ", C, "), got ",
                w_head.scalar_type(), " ", w_head.sizes(), " on ", w_head.device());
  } else {
    TORCH_CHECK(w_head.dim() == 2 && w_head.size(1) * (8 / head_bits) == C, kOp, ": w_head must be a quantized ",
                "matrix (V, ", C, " / ", 8 / head_bits, ") for head_bits = ", head_bits, ", got shape ", w_head.sizes());
    try {
      quantized_linear(at::empty({0, C}, wpe.options()), w_head, *s_head, z_head, c10::nullopt, head_bits,
                       head_group_size, act_int8 && head_bits == 8);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, kOp, ": w_head / s_head / z_head: ", e.what_without_backtrace());
    }
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0, kOp, ": eps must be a positive finite number, got ", eps);

  // ---- the forward (see the header comment)
  // (B, C): a new tensor even when wte is fp32; quantized: the looked-up rows dequantized (QuantEmbedding)
  at::Tensor x = wte_bits != 0 ? quantized_embedding(wte, *s_wte, z_wte, wte_bits, wte_group_size, tok)
                               : wte.index_select(0, tok).to(at::kFloat);
  x.add_(wpe.index_select(0, ps));
  const at::Tensor lens = ps + 1;  // each row attends to positions 0..pos[b]
  const double scale = D > 0 ? 1.0 / std::sqrt(static_cast<double>(D)) : 1.0;
  // A block's linear: skinny_linear on a float matrix, quantized_linear on a quantized one (the
  // kernels QuantLinear's forward calls through the native backend).
  auto linear = [&](const at::Tensor& in, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                    const OptList& s, const OptList& z, int64_t l) {
    if (bits == 0) return skinny_linear(in, w, b);
    return quantized_linear(in, w, *s.get(l), z.size() ? z.get(l) : c10::nullopt, b, bits, group_size,
                            act_int8 && bits == 8);
  };
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor kc = k_cache[l], vc = v_cache[l];
    at::Tensor h = std::get<0>(layer_norm_fwd(x, ln1_w.get(l), ln1_b.get(l), eps));
    const at::Tensor qkv = linear(h, w_qkv[l], b_qkv.get(l), s_qkv, z_qkv, l);  // (B, 3C)
    write_kv(qkv, kc, vc, pp);
    const at::Tensor q = qkv.view({B, 3, H, D}).select(1, 0).unsqueeze(2);  // (B, H, 1, D) view
    const at::Tensor y = decode_attention_cpu(q, kc, vc, lens, scale);     // (B, H, 1, D) contiguous
    x.add_(linear(y.view({B, C}), w_o[l], b_o.get(l), s_o, z_o, l));
    h = std::get<0>(layer_norm_fwd(x, ln2_w.get(l), ln2_b.get(l), eps));
    if (bits == 0) {
      x.add_(gelu_mlp_infer(h, w_fc[l], b_fc.get(l), w_proj[l], b_proj.get(l), exact_gelu));
    } else {  // the model's MLP on quantized linears: c_fc, F.gelu, c_proj (the same ATen GELU)
      const at::Tensor a = at::gelu(linear(h, w_fc[l], b_fc.get(l), s_fc, z_fc, l), exact_gelu ? "none" : "tanh");
      x.add_(linear(a, w_proj[l], b_proj.get(l), s_proj, z_proj, l));
    }
  }
  x = std::get<0>(layer_norm_fwd(x, lnf_w, lnf_b, eps));
  if (head_bits != 0)
    return quantized_linear(x, w_head, *s_head, z_head, c10::nullopt, head_bits, head_group_size,
                            act_int8 && head_bits == 8);
  return skinny_linear(x, w_head, c10::nullopt);  // (B, V) fp32
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("decode_step", &gptfast::decode_step); }
