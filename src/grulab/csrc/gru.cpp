// Native tier of grulab.fused: one GRU layer (one direction), forward and
// hand-written backward through time, with the whole time loop in C++.
//
// The maths is derived in the docstring of src/grulab/fused.py; this file
// follows it line by line. Shapes: T steps, B batch, I inputs, H hidden.
// Gate blocks are stacked r | z | n, as torch.nn.GRU stores them.
//
// Per time step the forward does one GEMM (h_{t-1} W_hh^T) and one fused loop
// for the gate arithmetic; the backward does one GEMM (dG_h W_hh) and one
// fused loop for the gate gradients (reset_after=False needs two of each,
// because W_hn multiplies r*h). Everything that can be batched over time (the
// input projections, dX, dW_ih, dW_hh, the bias gradients) is one big GEMM or
// reduction outside the loop.
//
// Compiled at first use by grulab.fused with -O3 -march=native -ffast-math
// -fopenmp. GEMMs: the big ones through ATen (MKL, both cores); the per-step
// ones are called single-threaded by each of our threads on its own slice,
// through MKL's sgemm_/dgemm_ exported by libtorch_cpu (ATen if absent).
// (The OpenBLAS of scipy-openblas32 was measured too: no faster here.)

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

using at::Tensor;

namespace {

// ---------------------------------------------------------------------------
// GEMM: C = beta * C + A @ B on 2-D (possibly strided / transposed) views.
// ---------------------------------------------------------------------------

void gemm(const Tensor& A, const Tensor& B, Tensor& C, double beta) {
  if (C.numel() == 0) return;
  if (beta == 0.0) {
    at::mm_out(C, A, B);
  } else {
    C.addmm_(A, B, beta, 1.0);
  }
}

// Horizontal sums of four vectors: returns {Σ s0, Σ s1, Σ s2, Σ s3}.
template <typename T, typename V>
inline void hsum4(V s0, V s1, V s2, V s3, T* r) {
#ifdef __AVX2__
  if constexpr (std::is_same<T, float>::value) {
    const __m256 t01 = _mm256_hadd_ps((__m256)s0, (__m256)s1);
    const __m256 t23 = _mm256_hadd_ps((__m256)s2, (__m256)s3);
    const __m256 t = _mm256_hadd_ps(t01, t23);  // lane i (mod 4) holds partial sums of s_i
    _mm_storeu_ps(r, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    return;
  } else {
    const __m256d t01 = _mm256_hadd_pd((__m256d)s0, (__m256d)s1);  // s0 s1 s0 s1 (halves)
    const __m256d t23 = _mm256_hadd_pd((__m256d)s2, (__m256d)s3);
    _mm256_storeu_pd(r, _mm256_add_pd(_mm256_permute2f128_pd(t01, t23, 0x20),
                                      _mm256_permute2f128_pd(t01, t23, 0x31)));
    return;
  }
#endif
  constexpr int64_t L = sizeof(V) / sizeof(T);
  T a = 0, b = 0, c = 0, d = 0;
  for (int64_t i = 0; i < L; ++i) {
    a += s0[i];
    b += s1[i];
    c += s2[i];
    d += s3[i];
  }
  r[0] = a, r[1] = b, r[2] = c, r[3] = d;
}

// C (M, N) = A (M, K) @ W (N, K)^T + bias (N, or null) for small M (1..4:
// generation, B = 1), where BLAS is slow. One pass over W, four rows of W at a
// time so that four independent FMA chains are in flight. N is split across
// threads when called outside the time loop's own threads.
template <typename T>
void small_linear(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W,
                  int64_t ldw, const T* bias, T* C, int64_t ldc) {
  typedef T V __attribute__((vector_size(32)));  // 8 floats / 4 doubles (AVX2)
  constexpr int64_t L = 32 / sizeof(T);
  auto load = [](const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; };
  const int64_t grain = std::max<int64_t>(16, (1 << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const T* a = A + m * lda;
      T* c = C + m * ldc;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {
        const T* w0 = W + n * ldw;
        const T* w1 = w0 + ldw;
        const T* w2 = w1 + ldw;
        const T* w3 = w2 + ldw;
        V s0 = {}, s1 = {}, s2 = {}, s3 = {};
        int64_t k = 0;
        for (; k + L <= K; k += L) {
          const V av = load(a + k);
          s0 += av * load(w0 + k);
          s1 += av * load(w1 + k);
          s2 += av * load(w2 + k);
          s3 += av * load(w3 + k);
        }
        T r[4];
        hsum4<T, V>(s0, s1, s2, s3, r);
        for (; k < K; ++k) {
          r[0] += a[k] * w0[k];
          r[1] += a[k] * w1[k];
          r[2] += a[k] * w2[k];
          r[3] += a[k] * w3[k];
        }
        for (int i = 0; i < 4; ++i) c[n + i] = r[i] + (bias ? bias[n + i] : T(0));
      }
      for (; n < n1; ++n) {
        const T* w = W + n * ldw;
        T r = 0;
        for (int64_t k = 0; k < K; ++k) r += a[k] * w[k];
        c[n] = r + (bias ? bias[n] : T(0));
      }
    }
  });
}

bool rows_contiguous(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// C (M, N) = A (M, K) @ W (N, K)^T + bias (N)   (bias may be undefined).
void linear(const Tensor& A, const Tensor& W, const Tensor& bias, Tensor& C) {
  const int64_t M = A.size(0), N = W.size(0), K = W.size(1);
  const bool small = M <= 4 && rows_contiguous(A) && rows_contiguous(W) && rows_contiguous(C);
  if (small) {
    AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "grulab_small_linear", [&] {
      small_linear<scalar_t>(M, N, K, A.data_ptr<scalar_t>(), A.stride(0), W.data_ptr<scalar_t>(),
                             W.stride(0), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                             C.data_ptr<scalar_t>(), C.stride(0));
    });
    return;
  }
  if (bias.defined()) {
    C.copy_(bias.expand({M, N}));
    gemm(A, W.t(), C, 1.0);
  } else {
    gemm(A, W.t(), C, 0.0);
  }
}

// ---------------------------------------------------------------------------
// Elementwise helpers. With -ffast-math gcc vectorises std::exp through glibc's
// libmvec (8 floats / 4 doubles per call). The clamp keeps exp finite, which
// fast-math assumes; σ(±80) is already 0 or 1 to double precision.
// ---------------------------------------------------------------------------

template <typename T>
inline T sigmoid(T a) {
  a = std::min(std::max(a, T(-80)), T(80));
  return T(1) / (T(1) + std::exp(-a));
}

template <typename T>
inline T tanh_(T a) {
  return T(2) * sigmoid(T(2) * a) - T(1);  // tanh(a) = 2σ(2a) − 1
}

// ---------------------------------------------------------------------------
// Single-threaded GEMM, called by each thread of the time loop on its own slice.
// Row-major: C (M, N) = op(A) (M, K) @ op(B) (K, N) + beta * C.
// ---------------------------------------------------------------------------

// MKL's Fortran BLAS, exported by the torch wheel's libtorch_cpu. Weak, so that
// a torch built without it still loads this module (we then use at::mm).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

template <typename T>
void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                  const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
                  const T* beta, T* c, const int* ldc);
template <>
void fortran_gemm<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b,
                         const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
void fortran_gemm<double>(const char* ta, const char* tb, const int* m, const int* n,
                          const int* k, const double* alpha, const double* a, const int* lda,
                          const double* b, const int* ldb, const double* beta, double* c,
                          const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <typename T>
bool have_fortran_gemm() {
  return std::is_same<T, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// ta / tb: A is stored as (K, M) / B as (N, K), each with leading dimension lda / ldb.
template <typename T>
void gemm_serial(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                 const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (!ta && tb && M <= 4) {  // a few rows times W^T (generation): our own kernel
    if (beta == T(0)) {
      small_linear<T>(M, N, K, A, lda, B, ldb, nullptr, C, ldc);
    } else {
      std::vector<T> tmp(M * N);
      small_linear<T>(M, N, K, A, lda, B, ldb, nullptr, tmp.data(), N);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta * C[m * ldc + n] + tmp[m * N + n];
    }
    return;
  }
  if (have_fortran_gemm<T>()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
    const T one = 1;
    fortran_gemm<T>(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C,
                    &lc);
    return;
  }
  // Portable fallback: ATen on views of the raw buffers.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = ta ? at::from_blob(const_cast<T*>(A), {M, K}, {1, lda}, opts)
                : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = tb ? at::from_blob(const_cast<T*>(B), {K, N}, {1, ldb}, opts)
                : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) {
    c.copy_(at::mm(a, b));
  } else {
    c.mul_(beta).add_(at::mm(a, b));
  }
}

// Split H hidden units among the threads: thread k owns units [j0, j1).
// Chunks are multiples of 8 so the vectorised loops start aligned to a lane.
inline void hidden_slice(int64_t H, int nthreads, int k, int64_t& j0, int64_t& j1) {
  int64_t chunk = (H + nthreads - 1) / nthreads;
  if (H >= 8 * nthreads) chunk = (chunk + 7) / 8 * 8;
  j0 = std::min<int64_t>(H, k * chunk);
  j1 = std::min<int64_t>(H, j0 + chunk);
}

// Threads for the time loop: torch's intra-op count, unless a step is so small
// that a barrier per step costs more than it saves.
inline int loop_threads(int64_t B, int64_t H) {
  const int64_t macs_per_step = 3 * B * H * H;
  if (macs_per_step < (1 << 16)) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H / 8)));
}

// ---------------------------------------------------------------------------
// Fast path of the forward time loop: float32, reset_after=True, AVX2+FMA.
//
// Per step a thread needs, for its units [j0, j1), the three gate columns
// j, H + j, 2H + j of h_{t-1} W_hh^T: an (B, 3hk) GEMM with K = H. Called
// through BLAS, each call re-packs W (and the three gates come back in a
// buffer that the gate loop then reads again). Here instead:
//
// * Pack once per call. The thread's rows of W_hh are copied into panels of
//   8 units: panel p holds, for k = 0..H-1, the 24 floats
//       W_r[u0..u0+8, k] | W_z[u0..u0+8, k] | W_n[u0..u0+8, k]     (u0 = j0 + 8p)
//   contiguously, so the micro-kernel reads one panel as a single stream.
//   (Units past j1 are zero-padded.) The packed slice (hk·3H floats, 384 KiB
//   for H = 256 on two threads) stays in the core's L2 for all T steps.
// * A 4 × 24 register tile. For 4 batch rows and the 8 units of a panel, the
//   micro-kernel keeps the r, z and n pre-activations in 12 AVX registers
//   (4 rows × 3 gates × 8 lanes), broadcasting h_{t-1}[b, k] and loading the
//   panel's 24 weights of column k: 12 FMAs per k (+ 3 loads, 4 broadcasts).
// * Gates in the epilogue. The tile goes straight into the gate arithmetic
//   (σ, tanh, the new h) for those 4 rows × 8 units; no (B, 3H) buffer.
// ---------------------------------------------------------------------------

#ifdef __AVX2__
constexpr int64_t kPanel = 8;  // units per panel (one AVX register of floats)
constexpr int64_t kRows = 4;   // batch rows per register tile

// Pack W_hh rows of units [j0, j1) (all three gates) into panels; see above.
void pack_w_hh(const float* w_hh, int64_t H, int64_t j0, int64_t j1, float* packed) {
  const int64_t npanels = (j1 - j0 + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < npanels; ++p) {
    float* dst = packed + p * H * 3 * kPanel;  // (H, 24)
    for (int g = 0; g < 3; ++g)
      for (int64_t u = 0; u < kPanel; ++u) {
        const int64_t j = j0 + p * kPanel + u;
        const float* src = w_hh + (g * H + j) * H;  // row of W_hh for gate g, unit j
        for (int64_t k = 0; k < H; ++k)
          dst[k * 3 * kPanel + g * kPanel + u] = j < j1 ? src[k] : 0.f;
      }
  }
}

// acc (4, 24) = h rows a[0..3] (each K floats) @ panel (K, 24).
inline void tile_4x24(const float* a0, const float* a1, const float* a2, const float* a3,
                      const float* panel, int64_t K, float* acc) {
  __m256 r0 = _mm256_setzero_ps(), z0 = r0, n0 = r0, r1 = r0, z1 = r0, n1 = r0;
  __m256 r2 = r0, z2 = r0, n2 = r0, r3 = r0, z3 = r0, n3 = r0;
  for (int64_t k = 0; k < K; ++k, panel += 3 * kPanel) {
    __m256 wr = _mm256_loadu_ps(panel);
    __m256 wz = _mm256_loadu_ps(panel + kPanel);
    __m256 wn = _mm256_loadu_ps(panel + 2 * kPanel);
    // Keep the three weight vectors in registers. Otherwise gcc folds each load
    // into the four FMAs that use it (16 loads per k instead of 7), and Zen 3's
    // two 256-bit loads per cycle, not its FMA units, set the pace: measured
    // 50 vs 99 GFLOP/s per core for this tile.
    asm("" : "+x"(wr), "+x"(wz), "+x"(wn));
    __m256 a = _mm256_broadcast_ss(a0 + k);
    r0 = _mm256_fmadd_ps(a, wr, r0), z0 = _mm256_fmadd_ps(a, wz, z0), n0 = _mm256_fmadd_ps(a, wn, n0);
    a = _mm256_broadcast_ss(a1 + k);
    r1 = _mm256_fmadd_ps(a, wr, r1), z1 = _mm256_fmadd_ps(a, wz, z1), n1 = _mm256_fmadd_ps(a, wn, n1);
    a = _mm256_broadcast_ss(a2 + k);
    r2 = _mm256_fmadd_ps(a, wr, r2), z2 = _mm256_fmadd_ps(a, wz, z2), n2 = _mm256_fmadd_ps(a, wn, n2);
    a = _mm256_broadcast_ss(a3 + k);
    r3 = _mm256_fmadd_ps(a, wr, r3), z3 = _mm256_fmadd_ps(a, wz, z3), n3 = _mm256_fmadd_ps(a, wn, n3);
  }
  const __m256 all[12] = {r0, z0, n0, r1, z1, n1, r2, z2, n2, r3, z3, n3};
  for (int i = 0; i < 12; ++i) _mm256_storeu_ps(acc + i * kPanel, all[i]);
}

// The forward loop of forward_loop() below for float32 / reset_after=True,
// with the packed weights and fused epilogue. Same threads, same barrier.
void forward_loop_packed(const float* gx, const float* h0, const float* w_hh, const float* b_hh,
                         int64_t Tn, int64_t B, int64_t H, bool save, float* out, float* saved) {
  const int nt = loop_threads(B, H);
#pragma omp parallel num_threads(nt)
  {
    const int k = omp_get_thread_num(), nk = omp_get_num_threads();
    int64_t j0, j1;
    hidden_slice(H, nk, k, j0, j1);
    const int64_t npanels = (j1 - j0 + kPanel - 1) / kPanel;
    std::vector<float> packed(std::max<int64_t>(npanels, 1) * H * 3 * kPanel);
    pack_w_hh(w_hh, H, j0, j1, packed.data());

    for (int64_t t = 0; t < Tn; ++t) {
      const float* hp = t == 0 ? h0 : out + (t - 1) * B * H;  // (B, H) h_{t-1}
      const float* gxt = gx + t * B * 3 * H;                  // (B, 3H)
      float* ht = out + t * B * H;                            // (B, H) h_t
      float* sv = saved + (save ? t : 0) * B * 4 * H;         // (B, 4H)
      for (int64_t p = 0; p < npanels; ++p) {
        const int64_t u0 = j0 + p * kPanel, nu = std::min(kPanel, j1 - u0);
        const float* panel = packed.data() + p * H * 3 * kPanel;
        for (int64_t b0 = 0; b0 < B; b0 += kRows) {
          // Rows past B repeat the last row; their results are not stored.
          auto row = [&](int64_t i) { return hp + std::min(b0 + i, B - 1) * H; };
          alignas(32) float acc[kRows * 3 * kPanel];  // (4, 24): r | z | n per row
          tile_4x24(row(0), row(1), row(2), row(3), panel, H, acc);
          for (int64_t i = 0; i < std::min(kRows, B - b0); ++i) {
            const int64_t b = b0 + i;
            const float* a = acc + i * 3 * kPanel;
            const float* gxb = gxt + b * 3 * H + u0;
            const float* bh = b_hh + u0;
            const float* hpb = hp + b * H + u0;
            float* hb = ht + b * H + u0;
            float* s = sv + b * 4 * H + u0;
#pragma omp simd
            for (int64_t u = 0; u < nu; ++u) {
              const float r = sigmoid(gxb[u] + a[u] + bh[u]);
              const float z = sigmoid(gxb[H + u] + a[kPanel + u] + bh[H + u]);
              const float c = a[2 * kPanel + u] + bh[2 * H + u];  // W_hn h_{t-1} + b_hn
              const float n = tanh_(gxb[2 * H + u] + r * c);
              hb[u] = n + z * (hpb[u] - n);  // = z h_{t-1} + (1 − z) n
              s[u] = r;
              s[H + u] = z;
              s[2 * H + u] = n;
              s[3 * H + u] = c;
            }
          }
        }
      }
#pragma omp barrier  // step t+1 reads all of h_t
    }
  }
}
#endif  // __AVX2__

// ---------------------------------------------------------------------------
// Forward time loop. Saved per step (B, 4H): r | z | n | c, where c is the
// n-gate's hidden-side term: reset_after: c = W_hn h_{t-1} + b_hn; else: c = r ⊙ h_{t-1}.
//
// Threads split the hidden units (not the batch): thread k computes, for its
// units [j0, j1), the three gate columns of h_{t-1} W_hh^T (its rows of W_hh
// stay in its core's cache from step to step) and then their gates. One barrier
// per step (reset_after=False: two), because step t+1 needs all of h_t.
// ---------------------------------------------------------------------------

template <typename T>
void forward_loop(const T* gx,    // (T, B, 3H) x W_ih^T + b_ih
                  const T* h0,    // (B, H)
                  const T* w_hh,  // (3H, H)
                  const T* b_hh,  // (3H,) (zeros if no bias)
                  int64_t Tn, int64_t B, int64_t H, bool reset_after, bool save,
                  T* out,         // (T, B, H)
                  T* saved) {     // (T or 1, B, 4H)
#ifdef __AVX2__
  if constexpr (std::is_same<T, float>::value) {
    if (reset_after) {
      forward_loop_packed(gx, h0, w_hh, b_hh, Tn, B, H, save, out, saved);
      return;
    }
  }
#endif
  const int nt = loop_threads(B, H);
#pragma omp parallel num_threads(nt)
  {
    const int k = omp_get_thread_num(), nk = omp_get_num_threads();
    int64_t j0, j1;
    hidden_slice(H, nk, k, j0, j1);
    const int64_t hk = j1 - j0;
    std::vector<T> gh_buf(B * 3 * std::max<int64_t>(hk, 1));
    T* gh = gh_buf.data();  // (B, 3hk): this thread's r | z | n columns of h_{t-1} W_hh^T

    for (int64_t t = 0; t < Tn; ++t) {
      const T* hp = t == 0 ? h0 : out + (t - 1) * B * H;  // (B, H) h_{t-1}
      const T* gxt = gx + t * B * 3 * H;                  // (B, 3H)
      T* ht = out + t * B * H;                            // (B, H) h_t
      T* sv = saved + (save ? t : 0) * B * 4 * H;         // (B, 4H)

      if (reset_after) {
        if (hk > 0) {
          for (int g = 0; g < 3; ++g)  // (B, hk) = h_{t-1} (B, H) @ W_hh[g*H + j0 : g*H + j1]^T
            gemm_serial<T>(false, true, B, hk, H, hp, H, w_hh + (g * H + j0) * H, H, T(0),
                           gh + g * hk, 3 * hk);
          for (int64_t b = 0; b < B; ++b) {
            const T* gxb = gxt + b * 3 * H;
            const T* ghb = gh + b * 3 * hk - j0;  // indexed by j below
            const T* hpb = hp + b * H;
            T* hb = ht + b * H;
            T* s = sv + b * 4 * H;
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) {
              const T r = sigmoid(gxb[j] + ghb[j] + b_hh[j]);
              const T z = sigmoid(gxb[H + j] + ghb[hk + j] + b_hh[H + j]);
              const T c = ghb[2 * hk + j] + b_hh[2 * H + j];  // W_hn h_{t-1} + b_hn
              const T n = tanh_(gxb[2 * H + j] + r * c);
              hb[j] = n + z * (hpb[j] - n);  // = z h_{t-1} + (1 − z) n
              s[j] = r;
              s[H + j] = z;
              s[2 * H + j] = n;
              s[3 * H + j] = c;
            }
          }
        }
#pragma omp barrier
      } else {
        if (hk > 0) {
          for (int g = 0; g < 2; ++g)  // r and z columns: (B, hk) each
            gemm_serial<T>(false, true, B, hk, H, hp, H, w_hh + (g * H + j0) * H, H, T(0),
                           gh + g * hk, 3 * hk);
          for (int64_t b = 0; b < B; ++b) {
            const T* gxb = gxt + b * 3 * H;
            const T* ghb = gh + b * 3 * hk - j0;
            const T* hpb = hp + b * H;
            T* s = sv + b * 4 * H;
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) {
              const T r = sigmoid(gxb[j] + ghb[j] + b_hh[j]);
              s[j] = r;
              s[H + j] = sigmoid(gxb[H + j] + ghb[hk + j] + b_hh[H + j]);
              s[3 * H + j] = r * hpb[j];  // c = r ⊙ h_{t-1}
            }
          }
        }
#pragma omp barrier  // the n columns need all of r ⊙ h_{t-1}
        if (hk > 0) {
          // (B, hk) = (r ⊙ h_{t-1}) (B, H) @ W_hn[j0 : j1]^T
          gemm_serial<T>(false, true, B, hk, H, sv + 3 * H, 4 * H, w_hh + (2 * H + j0) * H, H,
                         T(0), gh + 2 * hk, 3 * hk);
          for (int64_t b = 0; b < B; ++b) {
            const T* gxb = gxt + b * 3 * H;
            const T* ghb = gh + b * 3 * hk - j0;
            const T* hpb = hp + b * H;
            T* hb = ht + b * H;
            T* s = sv + b * 4 * H;
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) {
              const T z = s[H + j];
              const T n = tanh_(gxb[2 * H + j] + ghb[2 * hk + j] + b_hh[2 * H + j]);
              hb[j] = n + z * (hpb[j] - n);
              s[2 * H + j] = n;
            }
          }
        }
#pragma omp barrier
      }
    }
  }
}

// All tensors on the CPU, of one floating dtype, with matching sizes.
void check_native_args(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                       const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "grulab native GRU: float32 or float64 tensors only, got ", dtype);
  const int64_t I = x.size(-1), H = h.size(1);
  auto check = [&](const Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.device().is_cpu(), "grulab native GRU: ", name, " is not a CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, "grulab native GRU: ", name, " is ", t.scalar_type(),
                " but x is ", dtype);
    TORCH_CHECK(t.sizes() == shape, "grulab native GRU: ", name, " has shape ", t.sizes(),
                ", expected ", shape);
  };
  check(x, "x", x.sizes());
  check(h, "h", {x.size(-2), H});
  check(w_ih, "w_ih", {3 * H, I});
  check(w_hh, "w_hh", {3 * H, H});
  if (b_ih) check(*b_ih, "b_ih", {3 * H});
  if (b_hh) check(*b_hh, "b_hh", {3 * H});
}

// x (T, B, I), h0 (B, H) -> [out (T, B, H), h_T (B, H), saved (T, B, 4H) or (1, B, 4H)]
std::vector<Tensor> gru_forward(const Tensor& x_, const Tensor& h0_, const Tensor& w_ih_,
                                const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                const std::optional<Tensor>& b_hh_, bool reset_after, bool save) {
  TORCH_CHECK(x_.dim() == 3 && h0_.dim() == 2, "grulab native GRU: x must be (T, B, I), h (B, H)");
  TORCH_CHECK(x_.size(0) > 0, "grulab native GRU: empty sequence (T == 0)");
  check_native_args(x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_);
  const Tensor x = x_.contiguous(), h0 = h0_.contiguous();
  const Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor b_ih = b_ih_ ? b_ih_->contiguous() : Tensor();
  const Tensor b_hh = b_hh_ ? b_hh_->contiguous() : Tensor();
  const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(1);
  const auto opts = x.options();

  // Input projections of all steps in one GEMM.
  Tensor gx = at::empty({Tn, B, 3 * H}, opts);  // (T, B, 3H)
  Tensor gx2 = gx.view({Tn * B, 3 * H});        // (T*B, 3H)
  linear(x.view({Tn * B, I}), w_ih, b_ih, gx2);

  Tensor out = at::empty({Tn, B, H}, opts);                    // (T, B, H)
  Tensor saved = at::empty({save ? Tn : 1, B, 4 * H}, opts);   // (T, B, 4H)
  const Tensor b_hh_or_0 = b_hh.defined() ? b_hh : at::zeros({3 * H}, opts);  // (3H,)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grulab_gru_forward", [&] {
    forward_loop<scalar_t>(gx.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                           w_hh.data_ptr<scalar_t>(), b_hh_or_0.data_ptr<scalar_t>(), Tn, B, H,
                           reset_after, save, out.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>());
  });
  Tensor h_T = out[Tn - 1].clone();  // (B, H)
  return {out, h_T, saved};
}

// ---------------------------------------------------------------------------
// Single step for generation: x (B, I), h (B, H) -> h' (B, H), nothing saved.
// Same split of the hidden units as the time loop; every thread projects x and
// h onto its own gate columns, so a step is one fork/join (two for reset_after=False).
// ---------------------------------------------------------------------------

template <typename T>
void step_impl(const T* x, const T* h, const T* w_ih, const T* w_hh,
               const T* b_ih, const T* b_hh,  // (3H,) each (zeros if no bias)
               int64_t B, int64_t I, int64_t H, bool reset_after, T* h_new) {
  std::vector<T> rh_buf(reset_after ? 0 : B * H);
  T* rh = rh_buf.data();  // (B, H) r ⊙ h   (reset_after=False)
  const int nt = loop_threads(B, H);
#pragma omp parallel num_threads(nt)
  {
    const int k = omp_get_thread_num(), nk = omp_get_num_threads();
    int64_t j0, j1;
    hidden_slice(H, nk, k, j0, j1);
    const int64_t hk = j1 - j0;
    std::vector<T> buf(2 * B * 3 * std::max<int64_t>(hk, 1));
    T* gi = buf.data();         // (B, 3hk) x W_ih^T, this thread's r | z | n columns
    T* gh = gi + B * 3 * hk;    // (B, 3hk) h W_hh^T
    if (hk > 0) {
      for (int g = 0; g < 3; ++g) {
        gemm_serial<T>(false, true, B, hk, I, x, I, w_ih + (g * H + j0) * I, I, T(0), gi + g * hk,
                       3 * hk);
        if (reset_after || g < 2)
          gemm_serial<T>(false, true, B, hk, H, h, H, w_hh + (g * H + j0) * H, H, T(0),
                         gh + g * hk, 3 * hk);
      }
      for (int64_t b = 0; b < B; ++b) {
        const T* gib = gi + b * 3 * hk - j0;  // indexed by j below
        const T* ghb = gh + b * 3 * hk - j0;
        const T* hb = h + b * H;
        T* hn = h_new + b * H;
        T* rhb = rh + b * H;
        if (reset_after) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T r = sigmoid(gib[j] + b_ih[j] + ghb[j] + b_hh[j]);
            const T z = sigmoid(gib[hk + j] + b_ih[H + j] + ghb[hk + j] + b_hh[H + j]);
            const T n = tanh_(gib[2 * hk + j] + b_ih[2 * H + j] + r * (ghb[2 * hk + j] + b_hh[2 * H + j]));
            hn[j] = n + z * (hb[j] - n);
          }
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j)
            rhb[j] = hb[j] * sigmoid(gib[j] + b_ih[j] + ghb[j] + b_hh[j]);
        }
      }
    }
    if (!reset_after) {
#pragma omp barrier  // the n columns need all of r ⊙ h
      if (hk > 0) {
        gemm_serial<T>(false, true, B, hk, H, rh, H, w_hh + (2 * H + j0) * H, H, T(0), gh + 2 * hk,
                       3 * hk);
        for (int64_t b = 0; b < B; ++b) {
          const T* gib = gi + b * 3 * hk - j0;
          const T* ghb = gh + b * 3 * hk - j0;
          const T* hb = h + b * H;
          T* hn = h_new + b * H;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T z = sigmoid(gib[hk + j] + b_ih[H + j] + ghb[hk + j] + b_hh[H + j]);
            const T n = tanh_(gib[2 * hk + j] + b_ih[2 * H + j] + ghb[2 * hk + j] + b_hh[2 * H + j]);
            hn[j] = n + z * (hb[j] - n);
          }
        }
      }
    }
  }
}

Tensor gru_step(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
                bool reset_after) {
  TORCH_CHECK(x_.dim() == 2 && h_.dim() == 2, "grulab native gru_step: x must be (B, I), h (B, H)");
  check_native_args(x_, h_, w_ih_, w_hh_, b_ih_, b_hh_);
  const Tensor x = x_.contiguous(), h = h_.contiguous();
  const Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  const Tensor zeros = (b_ih_ && b_hh_) ? Tensor() : at::zeros({3 * H}, x.options());
  const Tensor b_ih = b_ih_ ? b_ih_->contiguous() : zeros;  // (3H,)
  const Tensor b_hh = b_hh_ ? b_hh_->contiguous() : zeros;  // (3H,)
  Tensor h_new = at::empty({B, H}, x.options());            // (B, H)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grulab_gru_step", [&] {
    step_impl<scalar_t>(x.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                        w_hh.data_ptr<scalar_t>(), b_ih.data_ptr<scalar_t>(),
                        b_hh.data_ptr<scalar_t>(), B, I, H, reset_after,
                        h_new.data_ptr<scalar_t>());
  });
  return h_new;
}

// ---------------------------------------------------------------------------
// Backward time loop. Threads split the hidden units again: thread k computes
// the gate gradients of its units, and after a barrier (the GEMM needs the
// whole dG_h row) its columns of dL/dh_{t-1} = d ⊙ z + dG_h W_hh.
// ---------------------------------------------------------------------------

template <typename T>
void backward_loop(const T* grad_out,  // (T, B, H) or (1, B, H) of zeros (go_step = 0)
                   int64_t go_step,
                   T* dh,              // (B, H) in: dL/dh_T; out: dL/dh_0
                   const T* h0,        // (B, H)
                   const T* w_hh,      // (3H, H)
                   const T* out,       // (T, B, H)
                   const T* saved,     // (T, B, 4H) r | z | n | c
                   int64_t Tn, int64_t B, int64_t H, bool reset_after,
                   T* dgx,             // (T, B, 3H) out: dL/d(x-side pre-activations)
                   T* dgh) {           // (T, B, 3H) out: dL/d(h-side); == dgx if !reset_after
  std::vector<T> dh_other(B * H), drh_buf(B * H);
  T* const buf[2] = {dh, dh_other.data()};  // dL/dh_t and dL/dh_{t-1}, swapped each step
  T* drh = drh_buf.data();                  // (B, H) dL/d(r ⊙ h_{t-1})  (reset_after=False)
  const int nt = loop_threads(B, H);
#pragma omp parallel num_threads(nt)
  {
    const int k = omp_get_thread_num(), nk = omp_get_num_threads();
    int64_t j0, j1;
    hidden_slice(H, nk, k, j0, j1);
    const int64_t hk = j1 - j0;

    for (int64_t t = Tn - 1; t >= 0; --t) {
      const T* dh_t = buf[(Tn - 1 - t) % 2];   // (B, H) dL/dh_t from later steps
      T* dhp = buf[(Tn - t) % 2];              // (B, H) dL/dh_{t-1}, being built
      const T* hp = t == 0 ? h0 : out + (t - 1) * B * H;  // (B, H)
      const T* go = grad_out + t * go_step;               // (B, H)
      const T* sv = saved + t * B * 4 * H;                // (B, 4H)
      T* dgxt = dgx + t * B * 3 * H;                      // (B, 3H)
      T* dght = dgh + t * B * 3 * H;                      // (B, 3H)

      if (reset_after) {
        for (int64_t b = 0; b < B; ++b) {
          const T* s = sv + b * 4 * H;
          const T* hpb = hp + b * H;
          const T* gob = go + b * H;
          const T* dhb = dh_t + b * H;
          T* gx = dgxt + b * 3 * H;
          T* gh = dght + b * 3 * H;
          T* dhpb = dhp + b * H;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T r = s[j], z = s[H + j], n = s[2 * H + j], c = s[3 * H + j];
            const T d = dhb[j] + gob[j];                        // dL/dh_t
            const T da_n = d * (T(1) - z) * (T(1) - n * n);      // through tanh
            const T da_z = d * (hpb[j] - n) * z * (T(1) - z);    // through σ
            const T da_r = da_n * c * r * (T(1) - r);
            gx[j] = da_r;
            gx[H + j] = da_z;
            gx[2 * H + j] = da_n;
            gh[j] = da_r;
            gh[H + j] = da_z;
            gh[2 * H + j] = da_n * r;
            dhpb[j] = d * z;
          }
        }
#pragma omp barrier  // the GEMM reads the whole dG_h row
        // dhp[:, j0:j1] (B, hk) += dG_h (B, 3H) @ W_hh[:, j0:j1] (3H, hk)
        gemm_serial<T>(false, false, B, hk, 3 * H, dght, 3 * H, w_hh + j0, H, T(1), dhp + j0, H);
      } else {
        for (int64_t b = 0; b < B; ++b) {
          const T* s = sv + b * 4 * H;
          const T* hpb = hp + b * H;
          const T* gob = go + b * H;
          const T* dhb = dh_t + b * H;
          T* gx = dgxt + b * 3 * H;
          T* dhpb = dhp + b * H;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T z = s[H + j], n = s[2 * H + j];
            const T d = dhb[j] + gob[j];
            gx[H + j] = d * (hpb[j] - n) * z * (T(1) - z);     // da_z
            gx[2 * H + j] = d * (T(1) - z) * (T(1) - n * n);   // da_n
            dhpb[j] = d * z;
          }
        }
#pragma omp barrier  // the GEMM reads the whole da_n row
        // drh[:, j0:j1] (B, hk) = da_n (B, H) @ W_hn[:, j0:j1] (H, hk)
        gemm_serial<T>(false, false, B, hk, H, dgxt + 2 * H, 3 * H, w_hh + 2 * H * H + j0, H,
                       T(0), drh + j0, H);
        for (int64_t b = 0; b < B; ++b) {
          const T* s = sv + b * 4 * H;
          const T* hpb = hp + b * H;
          const T* g = drh + b * H;
          T* gx = dgxt + b * 3 * H;
          T* dhpb = dhp + b * H;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T r = s[j];
            gx[j] = g[j] * hpb[j] * r * (T(1) - r);  // da_r
            dhpb[j] += g[j] * r;
          }
        }
#pragma omp barrier  // the GEMM reads the whole [da_r, da_z] row
        // dhp[:, j0:j1] (B, hk) += [da_r, da_z] (B, 2H) @ W_hh[0:2H, j0:j1] (2H, hk)
        gemm_serial<T>(false, false, B, hk, 2 * H, dgxt, 3 * H, w_hh + j0, H, T(1), dhp + j0, H);
      }
    }
  }
  if (Tn % 2 == 1) std::copy(buf[1], buf[1] + B * H, dh);  // dL/dh_0 ended in the other buffer
}

// Weight gradient of a hidden-side block: dW (N, H) = Σ_t dA_t^T P_t, where
// P_0 = p0 (B, H) and P_t = p_rest[t-1] for t >= 1 (two GEMMs, no concatenation).
void hidden_weight_grad(const Tensor& dA, const Tensor& p0, const Tensor& p_rest, Tensor& dW) {
  const int64_t Tn = dA.size(0), B = dA.size(1), N = dA.size(2);
  gemm(dA[0].t(), p0, dW, 0.0);  // (N, H) = (N, B) @ (B, H)
  if (Tn > 1) {
    Tensor dA_rest = dA.narrow(0, 1, Tn - 1).reshape({(Tn - 1) * B, N});    // ((T-1)B, N)
    Tensor p = p_rest.reshape({(Tn - 1) * B, p_rest.size(2)});             // ((T-1)B, H)
    gemm(dA_rest.t(), p, dW, 1.0);  // (N, H) += (N, (T-1)B) @ ((T-1)B, H)
  }
}

// Returns [dx, dh0, dw_ih, dw_hh, db_ih, db_hh] (undefined -> None where not needed).
std::vector<Tensor> gru_backward(const std::optional<Tensor>& grad_out_,
                                 const std::optional<Tensor>& grad_hT_, const Tensor& x,
                                 const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                 const Tensor& out, const Tensor& saved, bool reset_after,
                                 bool has_b_ih, bool has_b_hh, bool need_x, bool need_h0) {
  const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(1);
  const auto opts = x.options();
  const Tensor grad_out = grad_out_ ? grad_out_->contiguous() : at::zeros({1, B, H}, opts);
  Tensor dh = grad_hT_ ? grad_hT_->clone(at::MemoryFormat::Contiguous)
                       : at::zeros({B, H}, opts);   // (B, H) dL/dh_T
  Tensor dgx = at::empty({Tn, B, 3 * H}, opts);     // (T, B, 3H) dL/d(x-side pre-activations)
  Tensor dgh = reset_after ? at::empty({Tn, B, 3 * H}, opts) : dgx;  // (T, B, 3H) hidden side

  const Tensor h0c = h0.contiguous(), w_hhc = w_hh.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grulab_gru_backward", [&] {
    backward_loop<scalar_t>(grad_out.data_ptr<scalar_t>(), grad_out.size(0) == 1 ? 0 : B * H,
                            dh.data_ptr<scalar_t>(), h0c.data_ptr<scalar_t>(),
                            w_hhc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            saved.data_ptr<scalar_t>(), Tn, B, H, reset_after,
                            dgx.data_ptr<scalar_t>(), dgh.data_ptr<scalar_t>());
  });

  // Everything batched over time: one GEMM or reduction each.
  Tensor dgx2 = dgx.view({Tn * B, 3 * H});  // (T*B, 3H)
  Tensor dx, dw_ih = at::empty({3 * H, I}, opts), dw_hh = at::empty({3 * H, H}, opts);
  if (need_x) {
    dx = at::empty({Tn * B, I}, opts);
    gemm(dgx2, w_ih, dx, 0.0);  // (T*B, I) = (T*B, 3H) @ (3H, I)
    dx = dx.view({Tn, B, I});
  }
  gemm(dgx2.t(), x.view({Tn * B, I}), dw_ih, 0.0);  // (3H, I) = (3H, T*B) @ (T*B, I)
  Tensor out_prev = out.narrow(0, 0, Tn - 1);        // (T-1, B, H) = h_1 .. h_{T-1}
  if (reset_after) {
    hidden_weight_grad(dgh, h0, out_prev, dw_hh);  // (3H, H)
  } else {
    Tensor dw_rz = dw_hh.narrow(0, 0, 2 * H), dw_n = dw_hh.narrow(0, 2 * H, H);
    hidden_weight_grad(dgx.narrow(2, 0, 2 * H), h0, out_prev, dw_rz);  // (2H, H)
    Tensor rh = saved.narrow(2, 3 * H, H);                              // (T, B, H) r ⊙ h_{t-1}
    Tensor da_n = dgx.narrow(2, 2 * H, H).reshape({Tn * B, H});         // (T*B, H)
    gemm(da_n.t(), rh.reshape({Tn * B, H}), dw_n, 0.0);                 // (H, H)
  }
  Tensor db_ih = has_b_ih ? dgx2.sum(0) : Tensor();                               // (3H,)
  Tensor db_hh = has_b_hh ? dgh.view({Tn * B, 3 * H}).sum(0) : Tensor();          // (3H,)
  return {dx, need_h0 ? dh : Tensor(), dw_ih, dw_hh, db_ih, db_hh};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &gru_forward, "GRU layer forward (native)");
  m.def("backward", &gru_backward, "GRU layer backward through time (native)");
  m.def("step", &gru_step, "single GRU step (native)");
}
