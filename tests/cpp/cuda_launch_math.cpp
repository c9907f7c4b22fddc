// CPU check of the launch arithmetic in csrc/cuda/launch.h (compiled with g++ alone by
// tests/test_cuda_launch_math.py; no CUDA runtime needed). For odd sizes it replays the index
// mapping the kernels use (same functions, same loops) and checks that every row / key / column /
// element is covered exactly once, that block sizes, grids and shared memory are legal, and that
// workspaces are large enough. Prints each failure; exits 1 if any.
//
// `--self-test` feeds deliberately broken mappings to the same checkers and exits 0 only if every
// one of them is caught (so the checks above can fail).
#define GPTFAST_LAUNCH_MATH_ONLY
#include "launch.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace gptfast::cuda;

static int g_failures = 0;
static bool g_quiet = false;

#define CHECK(cond, ...)                            \
  do {                                              \
    if (!(cond)) {                                  \
      ++g_failures;                                 \
      if (!g_quiet) {                               \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                   \
        std::printf("\n");                          \
      }                                             \
    }                                               \
  } while (0)

static const int64_t kSizes[] = {1, 17, 65, 1023, 1025};
static const int64_t kHeadDims[] = {16, 32, 64, 128};

// Every index in [0, n) hit exactly once by `visit(emit)`; nothing outside.
static bool covers_once(int64_t n, const std::function<void(const std::function<void(int64_t)>&)>& visit) {
  std::vector<int> hits(size_t(n), 0);
  bool ok = true;
  visit([&](int64_t i) {
    if (i < 0 || i >= n)
      ok = false;
    else
      ++hits[size_t(i)];
  });
  for (int64_t i = 0; i < n; ++i) ok = ok && hits[size_t(i)] == 1;
  return ok;
}

using TileFn = std::function<Range(int64_t idx, int64_t tile, int64_t n)>;

// Tiles 0 .. ntiles-1 of `tile` rows (visited in the kernel's order) cover [0, n) exactly once.
static bool tiles_cover(int64_t n, int64_t tile, int64_t ntiles, bool reversed, const TileFn& fn) {
  return covers_once(n, [&](auto emit) {
    for (int64_t y = 0; y < ntiles; ++y) {
      const int64_t idx = reversed ? ntiles - 1 - y : y;
      const Range r = fn(idx, tile, n);
      for (int64_t i = r.begin; i < r.end; ++i) emit(i);
    }
  });
}

// Threads of a block map to (row = tid / tpr, dims s + i * tpr): each of rows x D once.
static bool threads_cover_rows_dims(int64_t threads, int64_t rows, int64_t D, int64_t dpt) {
  const int64_t tpr = D / dpt;
  return tpr * dpt == D && covers_once(rows * D, [&](auto emit) {
           for (int64_t tid = 0; tid < threads; ++tid)
             for (int64_t i = 0; i < dpt; ++i) emit((tid / tpr) * D + i * tpr + tid % tpr);
         });
}

static void check_attention() {
  for (int64_t BH : {int64_t(1), int64_t(36)}) {
    for (int64_t T : kSizes) {
      for (int64_t D : kHeadDims) {
        CHECK(attn_head_dim_supported(D), "D=%lld should be supported", (long long)D);
        // forward
        const Launch f = attn_fwd_launch(BH, T, D);
        CHECK(launch_fits(f), "fwd launch T=%lld D=%lld: grid (%lld,%lld) block %lld smem %zu", (long long)T,
              (long long)D, (long long)f.grid.x, (long long)f.grid.y, (long long)f.block.x, f.smem);
        CHECK(f.grid.x == BH, "fwd grid.x");
        CHECK(tiles_cover(T, kAttnFwdBlockM, f.grid.y, true, tile_range), "fwd query rows T=%lld", (long long)T);
        const int64_t dpt = attn_fwd_dpt(int(D));
        CHECK(f.block.x == kAttnFwdBlockM * (D / dpt), "fwd block");
        CHECK(threads_cover_rows_dims(f.block.x, kAttnFwdBlockM, D, dpt), "fwd thread map D=%lld", (long long)D);
        CHECK(D / dpt <= 32 && 32 % (D / dpt) == 0, "fwd row group must sit inside a warp (shuffles)");
        for (int64_t qt = 0; qt < f.grid.y; ++qt) {
          const Range rows = tile_range(qt, kAttnFwdBlockM, T);
          const int64_t nk = attn_causal_key_tiles(rows.end, kAttnFwdBlockN);
          // keys 0 .. rows.end-1 (all any row of the tile may see) once, no tile past T.
          CHECK(tiles_cover(rows.end, kAttnFwdBlockN, nk, false, tile_range), "fwd key tiles qt=%lld", (long long)qt);
          CHECK(tile_range(nk - 1, kAttnFwdBlockN, T).begin < T, "fwd key tile past T");
        }
        // backward
        const Launch d = attn_bwd_delta_launch(BH * T);
        CHECK(launch_fits(d), "delta launch");
        CHECK(d.grid.x * kAttnDeltaRowsPerBlock >= BH * T && (d.grid.x - 1) * kAttnDeltaRowsPerBlock < BH * T,
              "delta rows");
        const Launch kv = attn_bwd_dkdv_launch(BH, T, D);
        CHECK(launch_fits(kv), "dkdv launch T=%lld D=%lld smem %zu", (long long)T, (long long)D, kv.smem);
        CHECK(tiles_cover(T, kAttnBwdBlockN, kv.grid.y, false, tile_range), "dkdv key tiles");
        const int64_t bdpt = attn_bwd_dpt(int(D));
        CHECK(threads_cover_rows_dims(kv.block.x, kAttnBwdBlockN, D, bdpt), "dkdv thread map");
        const int64_t nq = ceil_div(T, kAttnBwdBlockM);
        for (int64_t kt = 0; kt < kv.grid.y; ++kt) {
          const Range keys = tile_range(kt, kAttnBwdBlockN, T);
          const int64_t q0 = attn_causal_first_q_tile(keys.begin, kAttnBwdBlockM);
          // every query row >= keys.begin (the only rows that see these keys) is visited once
          CHECK(tile_range(q0, kAttnBwdBlockM, T).begin <= keys.begin, "dkdv first q tile too late");
          CHECK(covers_once(T, [&](auto emit) {
                  for (int64_t i = 0; i < tile_range(q0, kAttnBwdBlockM, T).begin; ++i) emit(i);
                  for (int64_t qt = q0; qt < nq; ++qt) {
                    const Range r = tile_range(qt, kAttnBwdBlockM, T);
                    for (int64_t i = r.begin; i < r.end; ++i) emit(i);
                  }
                }),
                "dkdv query tiles kt=%lld", (long long)kt);
        }
        const Launch q = attn_bwd_dq_launch(BH, T, D);
        CHECK(launch_fits(q), "dq launch");
        CHECK(tiles_cover(T, kAttnDqBlockM, q.grid.y, true, tile_range), "dq rows");
        CHECK(threads_cover_rows_dims(q.block.x, kAttnDqBlockM, D, bdpt), "dq thread map");
      }
    }
  }
  for (int64_t D : {int64_t(8), int64_t(48), int64_t(96), int64_t(256)})
    CHECK(!attn_head_dim_supported(D), "D=%lld must be rejected", (long long)D);
}

// Block-strided loop `for (i = tid; i < n; i += threads)` over all threads covers [0, n) once.
static bool strided_cover(int64_t n, int64_t threads) {
  return covers_once(n, [&](auto emit) {
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t i = t; i < n; i += threads) emit(i);
  });
}

static void check_layer_norm() {
  const int64_t Ns[] = {1, 80, 768, 1600, 50257, 6144, 6145, 12288};
  for (int64_t N : Ns) {
    for (size_t es : {size_t(4), size_t(2)}) {
      for (bool al : {true, false}) {
        const int vec = ln_vec(N, es, al);
        CHECK(vec == 1 || (vec * es == 16 && N % vec == 0 && al), "ln_vec N=%lld es=%zu", (long long)N, es);
        const int64_t nvec = N / vec;
        CHECK(nvec * vec == N, "ln vectors must tile the row exactly");
        const Launch f = ln_fwd_launch(5, N, vec);
        CHECK(launch_fits(f), "ln fwd launch N=%lld", (long long)N);
        CHECK(f.block.x <= kLnMaxThreads, "ln threads");
        CHECK(strided_cover(nvec, f.block.x), "ln fwd columns N=%lld vec=%d", (long long)N, vec);
        for (int64_t M : kSizes) {
          const Launch b = ln_bwd_launch(M, N, vec);
          CHECK(launch_fits(b), "ln bwd launch M=%lld N=%lld smem %zu", (long long)M, (long long)N, b.smem);
          CHECK(b.grid.x == ln_bwd_blocks(M), "ln bwd partial rows = grid");
          CHECK(b.block.x == f.block.x, "ln bwd thread count");
          // rows blockIdx.x, blockIdx.x + G, ...
          CHECK(covers_once(M, [&](auto emit) {
                  for (int64_t g = 0; g < b.grid.x; ++g)
                    for (int64_t r = g; r < M; r += b.grid.x) emit(r);
                }),
                "ln bwd rows M=%lld", (long long)M);
          CHECK(b.smem == 0 || b.smem + kLnScratchBytes <= kDefaultSmem, "ln bwd smem");
          const Launch r = ln_reduce_launch(N);
          CHECK(launch_fits(r), "ln reduce launch");
          CHECK(covers_once(N, [&](auto emit) {
                  for (int64_t bx = 0; bx < r.grid.x; ++bx)
                    for (int64_t tx = 0; tx < r.block.x; ++tx)
                      if (bx * kLnReduceCols + tx < N) emit(bx * kLnReduceCols + tx);
                }),
                "ln reduce columns");
          CHECK(covers_once(b.grid.x, [&](auto emit) {
                  for (int64_t ty = 0; ty < r.block.y; ++ty)
                    for (int64_t g = ty; g < b.grid.x; g += kLnReduceLanes) emit(g);
                }),
                "ln reduce partial rows");
        }
      }
    }
  }
  CHECK(ln_bwd_smem_acc(768) && ln_bwd_smem_acc(1600), "GPT-2 widths accumulate in shared memory");
  CHECK(!ln_bwd_smem_acc(12288), "12288 floats x 2 cannot fit 48 KB");
}

static void check_gelu() {
  const int64_t shapes[][2] = {{1, 1}, {17, 80}, {65, 3072}, {1023, 6400}, {1025, 3072}, {3, 50257}};
  for (auto& s : shapes) {
    const int64_t n = s[0] * s[1];
    for (int vec : {1, 4, 8}) {
      if (vec > 1 && s[1] % vec) continue;  // the launcher's rule
      const Launch l = gelu_launch(n, vec);
      CHECK(launch_fits(l), "gelu launch n=%lld", (long long)n);
      const int64_t stride = l.grid.x * l.block.x, nvec = n / vec;
      CHECK(nvec * vec == n, "gelu vectors tile n");
      CHECK(covers_once(nvec, [&](auto emit) {
              for (int64_t t = 0; t < stride; ++t)
                for (int64_t i = t; i < nvec; i += stride) emit(i);
            }),
            "gelu grid-stride n=%lld vec=%d", (long long)n, vec);
    }
  }
}

static void check_decode() {
  static_assert(kDecodeTile == 32, "softmax step uses one key per lane");
  static_assert(kDecodeThreads / 32 >= kDecodeMaxTq, "one warp per query");
  for (int64_t sms : {int64_t(108), int64_t(132)}) {
    for (int64_t BH : {int64_t(1), int64_t(12), int64_t(96), int64_t(768), int64_t(4096)}) {
      for (int64_t T_max : {int64_t(1), int64_t(17), int64_t(65), int64_t(1023), int64_t(1025), int64_t(4096),
                            int64_t(32768)}) {
        const DecodePlan p = decode_plan(BH, T_max, sms);
        CHECK(p.splits >= 1 && p.splits <= kDecodeMaxSplits, "splits %lld", (long long)p.splits);
        CHECK(p.chunk % kDecodeTile == 0 && p.chunk >= kDecodeTile, "chunk %lld", (long long)p.chunk);
        CHECK(tiles_cover(T_max, p.chunk, p.splits, false, tile_range), "decode chunks BH=%lld T_max=%lld",
              (long long)BH, (long long)T_max);
        CHECK((p.splits - 1) * p.chunk < T_max, "decode: an empty trailing split");
        if (BH >= 2 * sms) CHECK(p.splits == 1, "enough (b, h) blocks: no split needed");
        for (int64_t D : kHeadDims) {
          for (int64_t Tq = 1; Tq <= kDecodeMaxTq; ++Tq) {
            const Launch l = decode_split_launch(BH, p, D);
            CHECK(launch_fits(l), "decode split launch D=%lld smem %zu", (long long)D, l.smem);
            const int64_t R = (kDecodeMaxTq * D + kDecodeThreads - 1) / kDecodeThreads;
            CHECK(covers_once(Tq * D, [&](auto emit) {
                    for (int64_t t = 0; t < kDecodeThreads; ++t)
                      for (int64_t r = 0; r < R; ++r)
                        if (t + r * kDecodeThreads < Tq * D) emit(t + r * kDecodeThreads);
                  }),
                  "decode accumulators Tq=%lld D=%lld", (long long)Tq, (long long)D);
            // largest Acc / ML element the kernels touch must lie inside the workspace
            const int64_t ws = decode_workspace_floats(BH, Tq, D, p);
            const int64_t acc_last = ((p.splits - 1) * BH + BH - 1) * Tq * D + Tq * D - 1;
            const int64_t ml_last = p.splits * BH * Tq * D + (((p.splits - 1) * BH + BH - 1) * Tq + Tq - 1) * 2 + 1;
            CHECK(acc_last < p.splits * BH * Tq * D && ml_last < ws, "decode workspace too small");
            const Launch c = decode_combine_launch(BH, Tq, D);
            CHECK(launch_fits(c) && c.block.x >= D && c.grid.x == BH * Tq, "decode combine launch");
          }
        }
      }
    }
  }
}

static void check_sampling() {
  for (int64_t V : {int64_t(1), int64_t(65), int64_t(50257), int64_t(100000)}) {
    for (int64_t B : {int64_t(1), int64_t(64)}) {
      const Launch l = sample_launch(B, V);
      CHECK(launch_fits(l), "sample launch V=%lld", (long long)V);
      CHECK(l.grid.x == B, "one block per row");
      CHECK(l.block.x <= 1024 && l.block.x / 32 <= 32, "scratch holds one slot per warp");
      CHECK(strided_cover(V, l.block.x), "sample vocabulary V=%lld", (long long)V);
      // the scan walks chunks of block.x: chunk starts c0 = 0, block.x, ... cover [0, V)
      CHECK(covers_once(V, [&](auto emit) {
              for (int64_t c0 = 0; c0 < V; c0 += l.block.x)
                for (int64_t t = 0; t < l.block.x; ++t)
                  if (c0 + t < V) emit(c0 + t);
            }),
            "sample scan chunks");
    }
  }
}

// Quantized GEMV (quant_linear.cu): warp w of block (bx, by) owns column n = bx * kQLinWarps + w and
// rows by * R .. by * R + R - 1 (R = qlin_rows(M)) clipped to M: every (m, n) output exactly once.
static void check_quant_linear() {
  for (int64_t M : {int64_t(1), int64_t(2), int64_t(3), int64_t(5), int64_t(16), int64_t(17), int64_t(33),
                    int64_t(1000)}) {
    const int R = qlin_rows(M);
    CHECK(R >= 1 && R <= kQLinMaxRows && (R & (R - 1)) == 0 && R >= std::min<int64_t>(M, kQLinMaxRows),
          "qlin_rows(%lld) = %d", (long long)M, R);
    for (int64_t N : {int64_t(1), int64_t(37), int64_t(768), int64_t(50257)}) {
      const Launch l = qlin_launch(M, N);
      CHECK(launch_fits(l), "quant linear launch M=%lld N=%lld", (long long)M, (long long)N);
      CHECK(l.block.x == 32 * kQLinWarps, "whole warps, kQLinWarps of them");
      CHECK(covers_once(M * N, [&](auto emit) {
              for (int64_t by = 0; by < l.grid.y; ++by)
                for (int64_t bx = 0; bx < l.grid.x; ++bx)
                  for (int64_t w = 0; w < kQLinWarps; ++w) {
                    const int64_t n = bx * kQLinWarps + w;
                    if (n >= N) continue;
                    for (int64_t m = by * R; m < std::min<int64_t>(M, by * R + R); ++m) emit(m * N + n);
                  }
            }),
            "quant linear outputs M=%lld N=%lld", (long long)M, (long long)N);
    }
  }
}

// Broken mappings the checkers must reject.
static int self_test() {
  g_quiet = true;
  int caught = 0, total = 0;
  auto expect_fail = [&](const char* what, const std::function<void()>& f) {
    const int before = g_failures;
    f();
    ++total;
    if (g_failures > before)
      ++caught;
    else
      std::printf("SELF-TEST: broken '%s' was not detected\n", what);
  };
  const TileFn off_by_one = [](int64_t idx, int64_t tile, int64_t n) {
    Range r = tile_range(idx, tile, n);
    if (r.end < n) r.end += 1;  // overlaps the next tile
    return r;
  };
  const TileFn short_last = [](int64_t idx, int64_t tile, int64_t n) {
    Range r = tile_range(idx, tile, n);
    if (r.end == n && r.end > r.begin) r.end -= 1;  // drops the last row
    return r;
  };
  expect_fail("overlapping tiles", [&] { CHECK(tiles_cover(1025, 64, ceil_div(1025, 64), true, off_by_one), "x"); });
  expect_fail("short last tile", [&] { CHECK(tiles_cover(17, 64, 1, false, short_last), "x"); });
  expect_fail("one tile too few", [&] { CHECK(tiles_cover(1025, 64, 1025 / 64, false, tile_range), "x"); });
  expect_fail("too many threads", [&] {
    Launch l;
    l.block.x = 2048;
    CHECK(launch_fits(l), "x");
  });
  expect_fail("too much smem", [&] {
    Launch l;
    l.block.x = 128;
    l.smem = kDefaultSmem + 4;
    CHECK(launch_fits(l), "x");
  });
  expect_fail("wrong thread map", [&] { CHECK(threads_cover_rows_dims(64 * 2, 64, 128, 32), "x"); });
  expect_fail("stride too large", [&] {
    CHECK(covers_once(100, [&](auto emit) {
            for (int64_t t = 0; t < 32; ++t)
              for (int64_t i = t; i < 100; i += 33) emit(i);
          }),
          "x");
  });
  g_quiet = false;
  std::printf("self-test: %d/%d broken mappings detected\n", caught, total);
  return caught == total ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--self-test") == 0) return self_test();
  check_attention();
  check_layer_norm();
  check_gelu();
  check_decode();
  check_sampling();
  check_quant_linear();
  if (g_failures) {
    std::printf("%d launch-math checks failed\n", g_failures);
    return 1;
  }
  std::printf("all launch-math checks passed\n");
  return 0;
}
