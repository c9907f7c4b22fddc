// Schemas of gptfast's native ops: the one place they are declared (TORCH_LIBRARY may appear once).
// Implementations register per device: csrc/cpu/*.cpp under CPU, csrc/cuda/*.cpp under CUDA.
// Fake (meta) kernels and autograd are registered from Python in gptfast/ops/native/_meta.py.
//
// Conventions: 2-D row-major views are prepared by the Python wrapper where noted ((M, N) = all
// leading dims flattened); statistics (mean, rstd, lse) are fp32 whatever the input dtype.
#include <torch/library.h>

TORCH_LIBRARY(gptfast, m) {
  // q, k, v: (B, H, T, D). out: (B, H, T, D); lse: (B, H, T) fp32, log-sum-exp of each score row
  // (natural log, scaled scores), saved so the backward recomputes probabilities without storing them.
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // x: (M, N); weight, bias: (N,) or None. y: (M, N); mean, rstd: (M,) fp32.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  // dweight / dbias are always returned (as if weight = 1 / bias = 0 when absent); the caller drops them.
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias)");
  // x: (M, C); w_fc: (F, C); w_proj: (C_out, F) (nn.Linear layout). pre: (M, F), the pre-activation
  // x w_fc^T + b_fc, saved so the backward recomputes GELU from it instead of storing both.
  // exact: the exact GELU x Phi(x) (erf; nanoGPT, torch.nn.GELU()) instead of GPT-2's tanh approximation.
  m.def(
      "gelu_mlp_fwd(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, bool exact=False) "
      "-> (Tensor y, Tensor pre)");
  // The forward when nothing needs gradients (inference, generation): y only, and the CPU kernel
  // applies GELU in place on its one (M, F) buffer instead of keeping pre and h both alive.
  m.def("gelu_mlp_infer(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, bool exact=False) "
        "-> Tensor y");
  m.def(
      "gelu_mlp_bwd(Tensor dy, Tensor x, Tensor w_fc, Tensor w_proj, Tensor pre, bool exact=False) "
      "-> (Tensor dx, Tensor dw_fc, Tensor db_fc, Tensor dw_proj, Tensor db_proj)");
  // x: (M, K); weight: (N, K) (nn.Linear layout); bias: (N,) or None. Returns x weight^T + bias,
  // (M, N) contiguous, x's dtype. A kernel for small M (batched decoding): see csrc/cpu/skinny_linear.cpp.
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // One GPT-2 decoding step (CPU; see csrc/cpu/decode_step.cpp): tokens, pos (B,) int64; wte (V, C);
  // wpe (block_size, C); the block weights by name, one list per kind with one entry per block
  // (nn.Linear layouts; matrices fp32 or bf16, the rest fp32; Tensor? = may be None); w_head (V, C);
  // caches per block (B, H, T_max, D) fp32, K/V written at pos; exact_gelu as gelu_mlp's exact.
  // Quantized matrices (issue #20): bits 8 / 4 = the block matrices w_* are quantized_linear's qweights
  // in one format (bits, group_size; 0 = per channel), with s_* (one scale per layer) and z_* (zeros:
  // empty or one per layer, entries may be None); bits 0 = float matrices, s_* and z_* empty. The
  // head likewise with head_bits / head_group_size / s_head / z_head, the token embedding with
  // wte_bits / wte_group_size / s_wte / z_wte; act_int8 as quantized_linear's (int8 matrices only).
  // Returns (B, V) fp32 logits. Python: gptfast.ops.native.decode_step / DecodeStepWeights.
  m.def(
      "decode_step(Tensor tokens, Tensor pos, Tensor wte, Tensor wpe, Tensor?[] ln1_w, Tensor?[] ln1_b, "
      "Tensor[] w_qkv, Tensor?[] b_qkv, Tensor[] w_o, Tensor?[] b_o, Tensor?[] ln2_w, Tensor?[] ln2_b, "
      "Tensor[] w_fc, Tensor?[] b_fc, Tensor[] w_proj, Tensor?[] b_proj, Tensor? lnf_w, Tensor? lnf_b, "
      "Tensor w_head, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor?[] s_qkv, Tensor?[] z_qkv, "
      "Tensor?[] s_o, Tensor?[] z_o, Tensor?[] s_fc, Tensor?[] z_fc, Tensor?[] s_proj, Tensor?[] z_proj, "
      "Tensor? s_head, Tensor? z_head, Tensor? s_wte, Tensor? z_wte, float eps, bool exact_gelu=False, int bits=0, "
      "int group_size=0, int head_bits=0, int head_group_size=0, int wte_bits=0, int wte_group_size=0, "
      "bool act_int8=False) -> Tensor");
  // x: (M, K) fp32 (CUDA: fp32 / bf16 / fp16); qweight: int8 (N, K) (bits 8) or uint8 (N, K/2) packed
  // int4 (bits 4); scale: fp32 (N,) (group_size 0 = per output channel, int8 only) or fp16 (N, K/g);
  // zero: fp16 (N, K/g) (int4 with a zero point) or None; bias: (N,) x's dtype or None. Returns
  // x w^T + bias (M, N) in x's dtype, w the dequantized weight (formats: gptfast/ops/quant.py).
  // act_int8 (CPU, int8 formats): activations quantized per row and 32-block to int8 (llama.cpp q8_0);
  // see csrc/cpu/quant_linear.cpp.
  m.def(
      "quantized_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, Tensor? bias, int bits, "
      "int group_size, bool act_int8) -> Tensor");
  // q: (B, H, Tq, D); caches: (B, H, T_max, D); cache_lens: (B,) int64. See gptfast/ops/reference.py.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float scale) -> Tensor");
  // logits: (B, V); uniform: (B,) fp32 draws in [0, 1) made by the caller (torch.rand with the user's
  // generator), so every backend samples identically. top_k <= 0 = off; top_p >= 1 = off.
  // temperature == 0 = argmax. Returns (B,) int64.
  // The exact GELU's vectorised erf on its own (CPU, fp32; tests measure its accuracy).
  m.def("erf(Tensor x) -> Tensor");
  m.def("sample(Tensor logits, float temperature, int top_k, float top_p, Tensor uniform) -> Tensor");
}
