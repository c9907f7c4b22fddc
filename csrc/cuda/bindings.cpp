// Torch bindings of the CUDA kernels (csrc/cuda/*.cu): input checks, allocation, the current
// stream, and TORCH_LIBRARY_IMPL(gptfast, CUDA) for the ten schemas of csrc/registration.cpp.
//
// The .cu files hold only kernels and raw-pointer launchers (launch.h): they compile in seconds,
// while a .cu including torch headers takes ~80 s. All torch-facing code lives here, in plain C++.
// Every input is checked with TORCH_CHECK naming the op, the argument, what was expected and what
// came; launch failures surface as errors with cudaGetErrorString.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

#include "launch.h"

namespace gptfast {
namespace cuda {
namespace {

// c10's stream / guard headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS / cuSPARSE
// headers): the same current stream as at::cuda::getCurrentCUDAStream().
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Multiprocessor count of the current device, read once per device (split-K planning).
int num_sms() {
  static std::mutex mu;
  static std::vector<int> cache;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= int(cache.size())) cache.resize(dev + 1, 0);
  if (cache[dev] == 0) {
    int n = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    TORCH_CHECK(err == cudaSuccess, "gptfast: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
    cache[dev] = n;
  }
  return cache[dev];
}

// ---------------------------------------------------------------------------- checks

void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// `t` on `ref`'s device with `ref`'s dtype.
void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  check_cuda_tensor(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

void check_stats(const at::Tensor& t, const at::Tensor& x, int64_t M, const char* op, const char* name) {
  check_cuda_tensor(t, op, name);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  check_shape(t, {M}, op, name);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Kernels read (B, H, T, D) tensors through (b, h, t) strides and need a unit D stride only.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }
BHTStrides bht_strides(const at::Tensor& t) { return BHTStrides{t.stride(0), t.stride(1), t.stride(2)}; }

void check_head_dim(int64_t D, const char* op) {
  TORCH_CHECK(attn_head_dim_supported(D), op, ": head dim D must be one of 16, 32, 64, 128 on CUDA, got ", D);
}

void check_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be a finite number, got ", scale);
}

// ---------------------------------------------------------------------------- attention

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_op(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, double scale) {
  const char* op = "causal_attention_fwd";
  check_cuda_tensor(q_, op, "q");
  const DType dt = float_dtype(q_, op, "q");
  check_like(k_, q_, op, "k", "q");
  check_like(v_, q_, op, "v", "q");
  TORCH_CHECK(q_.dim() == 4, op, ": q must be 4-D (B, H, T, D), got shape ", q_.sizes());
  check_shape(k_, q_.sizes(), op, "k");
  check_shape(v_, q_.sizes(), op, "v");
  const int64_t B = q_.size(0), H = q_.size(1), T = q_.size(2), D = q_.size(3);
  check_head_dim(D, op);
  check_scale(scale, op);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  at::Tensor out = at::empty({B, H, T, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  check_launch(attention_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                             B, H, T, D, bht_strides(q), bht_strides(k), bht_strides(v), float(scale),
                             current_stream()),
               op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_op(const at::Tensor& dout_, const at::Tensor& q_,
                                                                    const at::Tensor& k_, const at::Tensor& v_,
                                                                    const at::Tensor& out_, const at::Tensor& lse_,
                                                                    double scale) {
  const char* op = "causal_attention_bwd";
  check_cuda_tensor(q_, op, "q");
  const DType dt = float_dtype(q_, op, "q");
  TORCH_CHECK(q_.dim() == 4, op, ": q must be 4-D (B, H, T, D), got shape ", q_.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_, "k"}, {v_, "v"}, {dout_, "dout"},
                                {out_, "out"}}) {
    check_like(t, q_, op, name, "q");
    check_shape(t, q_.sizes(), op, name);
  }
  const int64_t B = q_.size(0), H = q_.size(1), T = q_.size(2), D = q_.size(3);
  check_cuda_tensor(lse_, op, "lse");
  TORCH_CHECK(lse_.device() == q_.device(), op, ": lse must be on q's device ", q_.device(), ", got ", lse_.device());
  TORCH_CHECK(lse_.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_.scalar_type());
  check_shape(lse_, {B, H, T}, op, "lse");
  check_head_dim(D, op);
  check_scale(scale, op);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  const at::Tensor dout = dout_.contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  at::Tensor dq = at::empty({B, H, T, D}, q.options());
  at::Tensor dk = at::empty({B, H, T, D}, q.options());
  at::Tensor dv = at::empty({B, H, T, D}, q.options());
  at::Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  check_launch(attention_bwd(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                             lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                             dv.data_ptr(), B, H, T, D, bht_strides(q), bht_strides(k), bht_strides(v), float(scale),
                             current_stream()),
               op);
  return {dq, dk, dv};
}

at::Tensor decode_attention_op(const at::Tensor& q_, const at::Tensor& k_cache_, const at::Tensor& v_cache_,
                            const at::Tensor& cache_lens_, double scale) {
  const char* op = "decode_attention";
  check_cuda_tensor(q_, op, "q");
  const DType dt = float_dtype(q_, op, "q");
  check_like(k_cache_, q_, op, "k_cache", "q");
  check_like(v_cache_, q_, op, "v_cache", "q");
  TORCH_CHECK(q_.dim() == 4, op, ": q must be 4-D (B, H, Tq, D), got shape ", q_.sizes());
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), D = q_.size(3);
  TORCH_CHECK(k_cache_.dim() == 4 && k_cache_.size(0) == B && k_cache_.size(1) == H && k_cache_.size(3) == D, op,
              ": k_cache must have shape (", B, ", ", H, ", T_max, ", D, "), got ", k_cache_.sizes());
  const int64_t T_max = k_cache_.size(2);
  check_shape(v_cache_, k_cache_.sizes(), op, "v_cache");
  TORCH_CHECK(Tq >= 1 && Tq <= kDecodeMaxTq, op, ": q must hold 1..", kDecodeMaxTq,
              " query tokens (Tq) on CUDA, got Tq=", Tq);
  TORCH_CHECK(Tq <= T_max, op, ": Tq=", Tq, " exceeds the cache length T_max=", T_max);
  check_head_dim(D, op);
  check_scale(scale, op);
  check_cuda_tensor(cache_lens_, op, "cache_lens");
  TORCH_CHECK(cache_lens_.device() == q_.device(), op, ": cache_lens must be on q's device ", q_.device(), ", got ",
              cache_lens_.device());
  TORCH_CHECK(cache_lens_.scalar_type() == at::kLong || cache_lens_.scalar_type() == at::kInt, op,
              ": cache_lens must be int64 (or int32), got ", cache_lens_.scalar_type());
  check_shape(cache_lens_, {B}, op, "cache_lens");
  // Values (Tq <= cache_lens[b] <= T_max) are checked by the dispatcher (reading them here would
  // synchronise with the device); the kernel clamps them to [0, T_max] so it never reads out of bounds.
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = unit_last_stride(q_), kc = unit_last_stride(k_cache_), vc = unit_last_stride(v_cache_);
  const at::Tensor lens = cache_lens_.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, H, Tq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * H == 0) return out;
  const int sms = num_sms();
  const DecodePlan plan = decode_plan(B * H, T_max, sms);
  at::Tensor ws = at::empty({decode_workspace_floats(B * H, Tq, D, plan)}, q.options().dtype(at::kFloat));
  check_launch(decode_attention(dt, q.data_ptr(), kc.data_ptr(), vc.data_ptr(), lens.data_ptr<int64_t>(),
                                out.data_ptr(), ws.data_ptr<float>(), plan, B, H, Tq, T_max, D, bht_strides(q),
                                bht_strides(kc), bht_strides(vc), float(scale), current_stream()),
               op);
  return out;
}

// ---------------------------------------------------------------------------- layer norm

void check_ln_vec(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t N, const char* op,
                  const char* name) {
  if (!t.has_value()) return;
  check_like(*t, x, op, name, "x");
  check_shape(*t, {N}, op, name);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_op(const at::Tensor& x_,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias, double eps) {
  const char* op = "layer_norm_fwd";
  check_cuda_tensor(x_, op, "x");
  const DType dt = float_dtype(x_, op, "x");
  TORCH_CHECK(x_.dim() == 2, op, ": x must be 2-D (M, N), got shape ", x_.sizes());
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(N > 0, op, ": x must have N > 0 columns, got shape ", x_.sizes());
  check_ln_vec(weight, x_, N, op, "weight");
  check_ln_vec(bias, x_, N, op, "bias");
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite number, got ", eps);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  check_launch(layer_norm_fwd(dt, x.data_ptr(), w.defined() ? w.data_ptr() : nullptr,
                              b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), mean.data_ptr<float>(),
                              rstd.data_ptr<float>(), M, N, float(eps), current_stream()),
               op);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_op(const at::Tensor& dy_, const at::Tensor& x_,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean_, const at::Tensor& rstd_) {
  const char* op = "layer_norm_bwd";
  check_cuda_tensor(x_, op, "x");
  const DType dt = float_dtype(x_, op, "x");
  TORCH_CHECK(x_.dim() == 2, op, ": x must be 2-D (M, N), got shape ", x_.sizes());
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(N > 0, op, ": x must have N > 0 columns, got shape ", x_.sizes());
  check_like(dy_, x_, op, "dy", "x");
  check_shape(dy_, x_.sizes(), op, "dy");
  check_ln_vec(weight, x_, N, op, "weight");
  check_stats(mean_, x_, M, op, "mean");
  check_stats(rstd_, x_, M, op, "rstd");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({M, N}, x.options());
  at::Tensor dw = at::empty({N}, x.options());
  at::Tensor db = at::empty({N}, x.options());
  at::Tensor partial = at::empty({ln_bwd_blocks(M), 2, N}, x.options().dtype(at::kFloat));
  check_launch(layer_norm_bwd(dt, dy.data_ptr(), x.data_ptr(), w.defined() ? w.data_ptr() : nullptr,
                              mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr(),
                              db.data_ptr(), partial.data_ptr<float>(), M, N, current_stream()),
               op);
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------- gelu mlp

void check_mlp_weight(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_like(t, x, op, name, "x");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

void check_mlp_bias(const c10::optional<at::Tensor>& b, const at::Tensor& x, int64_t n, const char* op,
                    const char* name) {
  if (!b.has_value()) return;
  check_like(*b, x, op, name, "x");
  check_shape(*b, {n}, op, name);
}

std::tuple<at::Tensor, at::Tensor> gelu_mlp_fwd_op(const at::Tensor& x_, const at::Tensor& w_fc,
                                                const c10::optional<at::Tensor>& b_fc, const at::Tensor& w_proj,
                                                const c10::optional<at::Tensor>& b_proj, bool exact) {
  const char* op = "gelu_mlp_fwd";
  check_cuda_tensor(x_, op, "x");
  const DType dt = float_dtype(x_, op, "x");
  TORCH_CHECK(x_.dim() == 2, op, ": x must be 2-D (M, C), got shape ", x_.sizes());
  check_mlp_weight(w_fc, x_, op, "w_fc");
  check_mlp_weight(w_proj, x_, op, "w_proj");
  TORCH_CHECK(w_fc.size(1) == x_.size(1), op, ": w_fc must have shape (F, ", x_.size(1), ") to match x ",
              x_.sizes(), ", got ", w_fc.sizes());
  TORCH_CHECK(w_proj.size(1) == w_fc.size(0), op, ": w_proj must have shape (C_out, ", w_fc.size(0),
              ") to match w_fc ", w_fc.sizes(), ", got ", w_proj.sizes());
  const int64_t M = x_.size(0), F = w_fc.size(0);
  check_mlp_bias(b_fc, x_, F, op, "b_fc");
  check_mlp_bias(b_proj, x_, w_proj.size(0), op, "b_proj");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  at::Tensor pre = at::mm(x, w_fc.t()).contiguous();  // (M, F), cuBLAS; the bias is added by our epilogue
  at::Tensor h = at::empty_like(pre);
  const at::Tensor bf = b_fc.has_value() ? b_fc->contiguous() : at::Tensor();
  check_launch(gelu_bias_fwd(dt, pre.data_ptr(), bf.defined() ? bf.data_ptr() : nullptr, h.data_ptr(), M, F,
                             exact, current_stream()),
               op);
  at::Tensor y = b_proj.has_value() ? at::addmm(*b_proj, h, w_proj.t()) : at::mm(h, w_proj.t());  // (M, C_out)
  return {y, pre};
}

// No gradients wanted: the forward's y (the CUDA path keeps its two buffers; the saving that
// matters on CPU, GELU in place, is left to the Triton kernel's fused epilogue on GPUs).
at::Tensor gelu_mlp_infer_op(const at::Tensor& x, const at::Tensor& w_fc, const c10::optional<at::Tensor>& b_fc,
                             const at::Tensor& w_proj, const c10::optional<at::Tensor>& b_proj, bool exact) {
  return std::get<0>(gelu_mlp_fwd_op(x, w_fc, b_fc, w_proj, b_proj, exact));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_bwd_op(
    const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_fc, const at::Tensor& w_proj,
    const at::Tensor& pre_, bool exact) {
  const char* op = "gelu_mlp_bwd";
  check_cuda_tensor(x_, op, "x");
  const DType dt = float_dtype(x_, op, "x");
  TORCH_CHECK(x_.dim() == 2, op, ": x must be 2-D (M, C), got shape ", x_.sizes());
  check_mlp_weight(w_fc, x_, op, "w_fc");
  check_mlp_weight(w_proj, x_, op, "w_proj");
  TORCH_CHECK(w_fc.size(1) == x_.size(1), op, ": w_fc must have shape (F, ", x_.size(1), ") to match x ",
              x_.sizes(), ", got ", w_fc.sizes());
  TORCH_CHECK(w_proj.size(1) == w_fc.size(0), op, ": w_proj must have shape (C_out, ", w_fc.size(0),
              ") to match w_fc ", w_fc.sizes(), ", got ", w_proj.sizes());
  const int64_t M = x_.size(0), F = w_fc.size(0), C_out = w_proj.size(0);
  check_like(dy_, x_, op, "dy", "x");
  check_shape(dy_, {M, C_out}, op, "dy");
  check_like(pre_, x_, op, "pre", "x");
  check_shape(pre_, {M, F}, op, "pre");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), pre = pre_.contiguous();
  at::Tensor dpre = at::mm(dy, w_proj).contiguous();  // (M, F): dh, turned into dpre in place
  at::Tensor h = at::empty_like(pre);
  check_launch(gelu_bwd(dt, pre.data_ptr(), dpre.data_ptr(), h.data_ptr(), M * F, exact, current_stream()),
               op);
  at::Tensor dw_proj = at::mm(dy.t(), h);  // (C_out, F)
  at::Tensor db_proj = dy.sum(0);          // (C_out,), fp32 accumulation inside ATen
  at::Tensor dw_fc = at::mm(dpre.t(), x);  // (F, C)
  at::Tensor db_fc = dpre.sum(0);          // (F,)
  at::Tensor dx = at::mm(dpre, w_fc);      // (M, C)
  return {dx, dw_fc, db_fc, dw_proj, db_proj};
}

// ---------------------------------------------------------------------------- sampling

at::Tensor sample_op(const at::Tensor& logits_, double temperature, int64_t top_k, double top_p,
                  const at::Tensor& uniform_) {
  const char* op = "sample";
  check_cuda_tensor(logits_, op, "logits");
  TORCH_CHECK(at::isFloatingType(logits_.scalar_type()), op, ": logits must be a floating tensor, got ",
              logits_.scalar_type());
  TORCH_CHECK(logits_.dim() == 2, op, ": logits must be 2-D (B, V), got shape ", logits_.sizes());
  const int64_t B = logits_.size(0), V = logits_.size(1);
  TORCH_CHECK(V > 0, op, ": logits must have V > 0 columns, got shape ", logits_.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, op,
              ": temperature must be a finite number >= 0, got ", temperature);
  TORCH_CHECK(top_p > 0 && !std::isnan(top_p), op, ": top_p must be > 0 (>= 1 = off), got ", top_p);
  check_cuda_tensor(uniform_, op, "uniform");
  TORCH_CHECK(uniform_.device() == logits_.device(), op, ": uniform must be on logits' device ", logits_.device(),
              ", got ", uniform_.device());
  TORCH_CHECK(uniform_.scalar_type() == at::kFloat, op, ": uniform must be float32, got ", uniform_.scalar_type());
  check_shape(uniform_, {B}, op, "uniform");
  const c10::cuda::CUDAGuard guard(logits_.device());
  // Greedy on a non-fp32 input: argmax of the input itself (rounding to fp32 could create ties).
  if (temperature == 0.0 && logits_.scalar_type() != at::kFloat) return logits_.argmax(1);
  // The reference samples from logits.float(): exact for fp16 / bf16.
  const at::Tensor logits = logits_.to(at::kFloat).contiguous();
  const at::Tensor uniform = uniform_.contiguous();
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor probs = temperature == 0.0 ? at::empty({0}, logits.options()) : at::empty({B, V}, logits.options());
  // The reference compares fp32 values against a fp32-rounded temperature / top_p.
  check_launch(cuda::sample(logits.data_ptr<float>(), uniform.data_ptr<float>(), out.data_ptr<int64_t>(),
                            probs.data_ptr<float>(), B, V, float(temperature), top_k, float(std::min(top_p, 1.0)),
                            current_stream()),
               op);
  return out;
}

// ---------------------------------------------------------------------------- quantized linear

// x (M, K) (the Python wrapper flattens leading dims); formats: launch.h / gptfast/ops/quant.py.
// act_int8 (the native CPU's int8-activation option) is ignored: the CUDA kernel is weight-only.
at::Tensor quantized_linear_op(const at::Tensor& x_, const at::Tensor& qweight_, const at::Tensor& scale_,
                               const c10::optional<at::Tensor>& zero_, const c10::optional<at::Tensor>& bias_,
                               int64_t bits, int64_t group_size, bool act_int8) {
  (void)act_int8;
  const char* op = "quantized_linear";
  check_cuda_tensor(x_, op, "x");
  const DType dt = float_dtype(x_, op, "x");
  TORCH_CHECK(x_.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x_.sizes());
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || (bits == 8 && group_size == 0), op,
              ": group_size must be 32, 64 or 128", bits == 8 ? " (or 0: per output channel)" : "",
              " for bits=", bits, ", got ", group_size);
  check_cuda_tensor(qweight_, op, "qweight");
  TORCH_CHECK(qweight_.device() == x_.device(), op, ": qweight must be on x's device ", x_.device(), ", got ",
              qweight_.device());
  const at::ScalarType want_q = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK(qweight_.scalar_type() == want_q, op, ": qweight must be ", want_q, " for bits=", bits, ", got ",
              qweight_.scalar_type());
  TORCH_CHECK(qweight_.dim() == 2, op, ": qweight must be 2-D, got shape ", qweight_.sizes());
  const int64_t M = x_.size(0), N = qweight_.size(0), K = qweight_.size(1) * (8 / bits);
  TORCH_CHECK(x_.size(1) == K, op, ": x must have K = ", K, " columns to match qweight ", qweight_.sizes(),
              " (bits=", bits, "), got shape ", x_.sizes());
  TORCH_CHECK(group_size == 0 || K % group_size == 0, op, ": K = ", K, " must be a multiple of group_size ",
              group_size);
  TORCH_CHECK(bits == 8 || K % 32 == 0, op, ": int4 packing needs K % 32 == 0, got K = ", K);
  TORCH_CHECK(M <= kQLinMaxRows * kMaxGridYZ, op, ": at most ", kQLinMaxRows * kMaxGridYZ, " rows, got M = ", M);
  check_cuda_tensor(scale_, op, "scale");
  TORCH_CHECK(scale_.device() == x_.device(), op, ": scale must be on x's device ", x_.device(), ", got ",
              scale_.device());
  if (group_size == 0) {
    TORCH_CHECK(scale_.scalar_type() == at::kFloat, op, ": scale must be float32 (per channel), got ",
                scale_.scalar_type());
    check_shape(scale_, {N}, op, "scale");
  } else {
    TORCH_CHECK(scale_.scalar_type() == at::kHalf, op, ": scale must be float16 (per group), got ",
                scale_.scalar_type());
    check_shape(scale_, {N, K / group_size}, op, "scale");
  }
  if (zero_.has_value()) {
    TORCH_CHECK(bits == 4, op, ": zero is an int4 option (bits=4), got bits=", bits);
    check_like(*zero_, scale_, op, "zero", "scale");
    check_shape(*zero_, {N, K / group_size}, op, "zero");
  }
  if (bias_.has_value()) {
    check_like(*bias_, x_, op, "bias", "x");
    check_shape(*bias_, {N}, op, "bias");
  }
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), qweight = qweight_.contiguous(), scale = scale_.contiguous();
  const at::Tensor zero = zero_.has_value() ? zero_->contiguous() : at::Tensor();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  check_launch(cuda::quantized_linear(dt, x.data_ptr(), qweight.data_ptr(), scale.data_ptr(),
                                      zero.defined() ? zero.data_ptr() : nullptr,
                                      bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), M, N, K, int(bits),
                                      group_size, current_stream()),
               op);
  return y;
}

}  // namespace
}  // namespace cuda
}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("causal_attention_fwd", &gptfast::cuda::causal_attention_fwd_op);
  m.impl("causal_attention_bwd", &gptfast::cuda::causal_attention_bwd_op);
  m.impl("layer_norm_fwd", &gptfast::cuda::layer_norm_fwd_op);
  m.impl("layer_norm_bwd", &gptfast::cuda::layer_norm_bwd_op);
  m.impl("gelu_mlp_fwd", &gptfast::cuda::gelu_mlp_fwd_op);
  m.impl("gelu_mlp_infer", &gptfast::cuda::gelu_mlp_infer_op);
  m.impl("gelu_mlp_bwd", &gptfast::cuda::gelu_mlp_bwd_op);
  m.impl("decode_attention", &gptfast::cuda::decode_attention_op);
  m.impl("sample", &gptfast::cuda::sample_op);
  m.impl("quantized_linear", &gptfast::cuda::quantized_linear_op);
}
