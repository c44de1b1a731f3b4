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
//
// float32 with reset_after=True (torch.nn.GRU's cell) on an AVX2 machine takes
// a faster path, see "Packed-weight kernels" below: each thread packs its slice
// of the weights once per call and runs its own register-tiled micro-kernel,
// with the gate arithmetic applied straight to the tile (forward_packed), and
// the same tiles for the backward's per-step GEMM and for dX. On 2 Zen 3
// cores, (B, T, I, H) = (32, 35, 28, 256), it took the inference forward from
// ~3.9 to ~3.1 ms and forward + backward from ~11.6 to ~10.3 ms. float64 and
// reset_after=False keep the BLAS path.
//
// Tried for the backward's per-step GEMM and not kept (A/B of two builds in
// one process, interleaved): blocking K by 256 (at H = 1024, K = 3H = 3072)
// and 4 × 24 or 6 × 16 register tiles instead of 4 × 16: all within ±3%.
// What did pay: keeping the scratch buffers between calls (see scratch()),
// −14% forward + backward at the small shape; sharing the per-step panels
// between the threads (PanelQueue), −8 to −11% forward + backward at the small
// shape, neutral at the large one.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define GRULAB_PACKED 1  // the packed-weight kernels below (AVX2 + FMA intrinsics)
#endif

#include <algorithm>
#include <atomic>
#include <memory>
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

// ---------------------------------------------------------------------------
// Scratch buffers kept from call to call. A fresh buffer of a few MB is mapped
// anew by malloc and costs one page fault per 4 KiB on first touch (about
// 2 µs each on the VMs this was measured on: 2-3 ms of a 10 ms backward at
// (B, T, H) = (32, 35, 256)); a buffer kept from the previous call costs none.
// Only pure scratch goes here, never a tensor that is returned or saved for
// the backward. One set per calling thread; buffers over kScratchCap bytes are
// not kept. release_scratch() frees the calling thread's set.
// ---------------------------------------------------------------------------
constexpr int64_t kScratchCap = int64_t(256) << 20;
enum ScratchSlot { kGx = 0, kDgx = 1, kDgh = 2, kPackHH = 3, kPackIH = 4, kPackCols = 5, kNumSlots = 6 };

std::vector<Tensor>& scratch_set() {
  thread_local std::vector<Tensor>* set = new std::vector<Tensor>(kNumSlots);  // never destroyed
  return *set;
}

Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t n = 1;
  for (int64_t d : sizes) n *= d;
  if (n * static_cast<int64_t>(opts.dtype().itemsize()) > kScratchCap) return at::empty(sizes, opts);
  Tensor& buf = scratch_set()[slot];
  if (!buf.defined() || buf.numel() < n || buf.dtype() != opts.dtype()) {
    buf = Tensor();  // free the old one first
    buf = at::empty({n}, opts);
  }
  return buf.narrow(0, 0, n).view(sizes);
}

void release_scratch() {
  for (Tensor& t : scratch_set()) t = Tensor();
}

// Split H hidden units among the threads: thread k owns units [j0, j1).
// Chunks are multiples of 8 so the vectorised loops start aligned to a lane.
inline void hidden_slice(int64_t H, int nthreads, int k, int64_t& j0, int64_t& j1) {
  int64_t chunk = (H + nthreads - 1) / nthreads;
  if (H >= 8 * nthreads) chunk = (chunk + 7) / 8 * 8;
  j0 = std::min<int64_t>(H, k * chunk);
  j1 = std::min<int64_t>(H, j0 + chunk);
}

// Work sharing for the per-step loops. The P panels of a step are split into
// one home range per thread (the same units every step, so their packed
// weights stay in that core's cache); a thread takes panels from the front of
// its own range and, when that is empty, helps the others by taking from
// theirs. Claims are atomic, so every panel is done once. On a quiet machine
// each thread does its own range; on a VM whose vCPUs run at different speeds
// from moment to moment (measured: the same per-step GEMMs 2.6 ms on one
// thread, 4.7 ms on the other) the faster one no longer waits at the barrier.
// Two sets of cursors alternate between steps: while step t runs on set t % 2,
// thread 0 resets set (t + 1) % 2, which nobody uses until after the barrier.
class PanelQueue {
 public:
  PanelQueue(int64_t panels, int nthreads)
      : n_(nthreads), lo_(nthreads), hi_(nthreads), cur_(new Cursor[2 * nthreads]) {
    for (int k = 0; k < n_; ++k) {
      lo_[k] = panels * k / n_;
      hi_[k] = panels * (k + 1) / n_;
    }
    reset(0);
    reset(1);
  }
  int64_t home_lo(int k) const { return lo_[k]; }
  int64_t home_hi(int k) const { return hi_[k]; }
  void reset(int set) {
    for (int k = 0; k < n_; ++k) cur_[set * n_ + k].v.store(lo_[k], std::memory_order_relaxed);
  }
  // f(p) for every panel p this thread claims in cursor set `set`.
  template <typename F>
  void run(int set, int k, F&& f) {
    for (int i = 0; i < n_; ++i) {
      const int o = (k + i) % n_;
      for (;;) {
        const int64_t p = cur_[set * n_ + o].v.fetch_add(1, std::memory_order_relaxed);
        if (p >= hi_[o]) break;
        f(p);
      }
    }
  }

 private:
  struct alignas(64) Cursor {
    std::atomic<int64_t> v{0};
  };
  int n_;
  std::vector<int64_t> lo_, hi_;
  std::unique_ptr<Cursor[]> cur_;
};

// Threads for the time loop: torch's intra-op count, unless a step is so small
// that a barrier per step costs more than it saves.
inline int loop_threads(int64_t B, int64_t H) {
  const int64_t macs_per_step = 3 * B * H * H;
  if (macs_per_step < (1 << 16)) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H / 8)));
}

// ---------------------------------------------------------------------------
// Packed-weight kernels. Fast path of the forward (float32, reset_after=True,
// AVX2+FMA); its tiles are reused by the backward.
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

#ifdef GRULAB_PACKED
constexpr int64_t kPanel = 8;  // units per panel (one AVX register of floats)
constexpr int64_t kRows = 4;   // batch rows per register tile

// σ and tanh on 8 floats for the epilogue. glibc's vectorised expf (what gcc
// calls for std::exp in the generic loops) made the epilogue ~15% slower.
// (-ffast-math turns the division in sigmoid8 into a reciprocal estimate plus
// one Newton step; the tests' float32 tolerance holds either way.)
// exp(x) = 2^n · e^f with n = round(x / ln2), |f| <= ln2 / 2, and e^f a degree-7
// polynomial (Cephes' expf coefficients): relative error ~1.2e-7.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // f = x − n ln2, with ln2 split in two so that n · ln2_hi is exact.
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.f)));  // e^f
  // 2^n: n + 127 written into the exponent field of a float.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid8(__m256 a) {  // 1 / (1 + e^{−a})
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
}

inline __m256 tanh8(__m256 a) {  // tanh(a) = 2σ(2a) − 1
  return _mm256_fmsub_ps(_mm256_set1_ps(2.f), sigmoid8(_mm256_add_ps(a, a)), _mm256_set1_ps(1.f));
}

// Pack rows of W (3H, K: W_hh with K = H, or W_ih with K = I) for units
// [j0, j1), all three gates, into panels; see above.
void pack_gate_rows(const float* w, int64_t H, int64_t K, int64_t j0, int64_t j1, float* packed) {
  const int64_t npanels = (j1 - j0 + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < npanels; ++p) {
    float* dst = packed + p * K * 3 * kPanel;  // (K, 24)
    for (int g = 0; g < 3; ++g)
      for (int64_t u = 0; u < kPanel; ++u) {
        const int64_t j = j0 + p * kPanel + u;
        const float* src = w + (g * H + j) * K;  // row of W for gate g, unit j
        for (int64_t k = 0; k < K; ++k)
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

// The whole forward of gru_forward() for float32 / reset_after=True: packed
// weights, register tiles and the gate epilogue. Same threads and barrier as
// forward_loop() below, with one more difference: the input projection is not
// a separate (T·B, I) x (I, 3H) GEMM before the loop but a second, short
// (K = I) tile per step on packed W_ih. That GEMM ran at a modest rate (K is
// small) and wrote a (T, B, 3H) buffer that the loop then read back.
//
// bias (4H,) = [b_ir + b_hr | b_iz + b_hz | b_in | b_hn]: r and z only need the
// sum; the n gate keeps its two halves apart (a_n = x-side + r ⊙ h-side).
void forward_packed(const float* x,     // (T, B, I)
                    const float* h0,    // (B, H)
                    const float* w_ih,  // (3H, I)
                    const float* w_hh,  // (3H, H)
                    const float* bias,  // (4H,) see above
                    int64_t Tn, int64_t B, int64_t I, int64_t H, bool save,
                    float* out,         // (T, B, H)
                    float* saved) {     // (T or 1, B, 4H)
  const int nt = loop_threads(B, H);
  const int64_t P = (H + kPanel - 1) / kPanel;  // panels of 8 units
  PanelQueue queue(P, nt);
  // All panels of W_hh and W_ih, packed (see above); each thread packs its home range.
  Tensor packed_hh_t = scratch(kPackHH, {P * H * 3 * kPanel}, at::kFloat);
  Tensor packed_ih_t = scratch(kPackIH, {P * I * 3 * kPanel}, at::kFloat);
  float* const packed_hh = packed_hh_t.data_ptr<float>();
  float* const packed_ih = packed_ih_t.data_ptr<float>();
#pragma omp parallel num_threads(nt)
  {
    const int k = omp_get_thread_num();
    {
      const int64_t u0 = queue.home_lo(k) * kPanel, u1 = std::min(H, queue.home_hi(k) * kPanel);
      if (u1 > u0) {
        pack_gate_rows(w_hh, H, H, u0, u1, packed_hh + queue.home_lo(k) * H * 3 * kPanel);
        pack_gate_rows(w_ih, H, I, u0, u1, packed_ih + queue.home_lo(k) * I * 3 * kPanel);
      }
    }
#pragma omp barrier  // a thread may take panels that another one packed

    for (int64_t t = 0; t < Tn; ++t) {
      const float* hp = t == 0 ? h0 : out + (t - 1) * B * H;  // (B, H) h_{t-1}
      const float* xt = x + t * B * I;                        // (B, I) x_t
      float* ht = out + t * B * H;                            // (B, H) h_t
      float* sv = saved + (save ? t : 0) * B * 4 * H;         // (B, 4H)
      if (k == 0) queue.reset((t + 1) % 2);
      queue.run(t % 2, k, [&](int64_t p) {
        const int64_t u0 = p * kPanel, nu = std::min(kPanel, H - u0);
        const float* panel_hh = packed_hh + p * H * 3 * kPanel;
        const float* panel_ih = packed_ih + p * I * 3 * kPanel;
        for (int64_t b0 = 0; b0 < B; b0 += kRows) {
          // Rows past B repeat the last row; their results are not stored.
          auto row = [&](const float* m, int64_t ld, int64_t i) {
            return m + std::min(b0 + i, B - 1) * ld;
          };
          alignas(32) float ah[kRows * 3 * kPanel];  // (4, 24) h-side r | z | n per row
          alignas(32) float ax[kRows * 3 * kPanel];  // (4, 24) x-side r | z | n per row
          tile_4x24(row(hp, H, 0), row(hp, H, 1), row(hp, H, 2), row(hp, H, 3), panel_hh, H, ah);
          tile_4x24(row(xt, I, 0), row(xt, I, 1), row(xt, I, 2), row(xt, I, 3), panel_ih, I, ax);
          for (int64_t i = 0; i < std::min(kRows, B - b0); ++i) {
            const int64_t b = b0 + i;
            const float* gh = ah + i * 3 * kPanel;  // r | z | n, 8 units each
            const float* gx = ax + i * 3 * kPanel;
            const float* bs = bias + u0;
            const float* hpb = hp + b * H + u0;
            float* hb = ht + b * H + u0;
            float* s = sv + b * 4 * H + u0;
            if (nu == kPanel) {  // a full panel: the gate maths on 8 units at once
              auto ld = [](const float* q) { return _mm256_loadu_ps(q); };
              const __m256 r = sigmoid8(ld(gx) + ld(gh) + ld(bs));
              const __m256 z = sigmoid8(ld(gx + kPanel) + ld(gh + kPanel) + ld(bs + H));
              const __m256 c = ld(gh + 2 * kPanel) + ld(bs + 3 * H);  // W_hn h_{t-1} + b_hn
              const __m256 n = tanh8(ld(gx + 2 * kPanel) + ld(bs + 2 * H) + r * c);
              _mm256_storeu_ps(hb, n + z * (ld(hpb) - n));  // = z h_{t-1} + (1 − z) n
              if (save) {  // inference (save=false) keeps nothing
                _mm256_storeu_ps(s, r);
                _mm256_storeu_ps(s + H, z);
                _mm256_storeu_ps(s + 2 * H, n);
                _mm256_storeu_ps(s + 3 * H, c);
              }
              continue;
            }
            for (int64_t u = 0; u < nu; ++u) {  // a partial panel (last units of the slice)
              const float r = sigmoid(gx[u] + gh[u] + bs[u]);
              const float z = sigmoid(gx[kPanel + u] + gh[kPanel + u] + bs[H + u]);
              const float c = gh[2 * kPanel + u] + bs[3 * H + u];  // W_hn h_{t-1} + b_hn
              const float n = tanh_(gx[2 * kPanel + u] + bs[2 * H + u] + r * c);
              hb[u] = n + z * (hpb[u] - n);
              if (save) s[u] = r, s[H + u] = z, s[2 * H + u] = n, s[3 * H + u] = c;
            }
          }
        }
      });
#pragma omp barrier  // step t+1 reads all of h_t
    }
  }
}

// The backward's per-step GEMM, dL/dh_{t-1}[:, j0:j1] += dG_h (B, 3H) @ W_hh[:, j0:j1]
// (K = 3H), packed the same way into panels of 16 units. Its tile is 4 × 16
// (8 accumulators, 2 loads + 4 broadcasts per 8 FMAs): measured as fast per
// FLOP as 4 × 24 here, and a slice of 128 units needs no zero padding
// (6 panels of 24 would compute 144).
constexpr int64_t kCols = 16;  // units per backward panel

// acc (4, 16) = rows a[0..3] (each K floats) @ panel (K, 16).
inline void tile_4x16(const float* a0, const float* a1, const float* a2, const float* a3,
                      const float* panel, int64_t K, float* acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
  __m256 c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t k = 0; k < K; ++k, panel += kCols) {
    __m256 w0 = _mm256_loadu_ps(panel), w1 = _mm256_loadu_ps(panel + 8);
    asm("" : "+x"(w0), "+x"(w1));  // keep them in registers (see tile_4x24)
    __m256 a = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(a, w0, c00), c01 = _mm256_fmadd_ps(a, w1, c01);
    a = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(a, w0, c10), c11 = _mm256_fmadd_ps(a, w1, c11);
    a = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(a, w0, c20), c21 = _mm256_fmadd_ps(a, w1, c21);
    a = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(a, w0, c30), c31 = _mm256_fmadd_ps(a, w1, c31);
  }
  const __m256 all[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc + i * 8, all[i]);
}

// packed[p] (K, 16) = w[0:K, j0 + 16p : j0 + 16p + 16] (zero past j1); w is (K, ldw).
void pack_columns(const float* w, int64_t ldw, int64_t K, int64_t j0, int64_t j1, float* packed) {
  const int64_t npanels = (j1 - j0 + kCols - 1) / kCols;
  for (int64_t p = 0; p < npanels; ++p) {
    const int64_t u0 = j0 + p * kCols, nu = std::min(kCols, j1 - u0);
    float* dst = packed + p * K * kCols;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t u = 0; u < nu; ++u) dst[k * kCols + u] = w[k * ldw + u0 + u];
      for (int64_t u = nu; u < kCols; ++u) dst[k * kCols + u] = 0.f;
    }
  }
}

// C[:, j0:j1] (M, j1 − j0) += A (M, K) @ (the packed columns j0..j1 of a (K, ·) matrix).
void gemm_acc_packed(int64_t M, int64_t K, const float* A, int64_t lda, const float* packed,
                     int64_t j0, int64_t j1, float* C, int64_t ldc) {
  const int64_t npanels = (j1 - j0 + kCols - 1) / kCols;
  for (int64_t p = 0; p < npanels; ++p) {
    const int64_t u0 = j0 + p * kCols, nu = std::min(kCols, j1 - u0);
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      auto row = [&](int64_t i) { return A + std::min(m0 + i, M - 1) * lda; };
      alignas(32) float acc[kRows * kCols];
      tile_4x16(row(0), row(1), row(2), row(3), packed + p * K * kCols, K, acc);
      for (int64_t i = 0; i < std::min(kRows, M - m0); ++i) {
        float* c = C + (m0 + i) * ldc + u0;
        const float* a = acc + i * kCols;
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) c[u] += a[u];
      }
    }
  }
}

// C (M, N) += A (M, K) @ W (K, N), all row-major and dense, on all of torch's
// threads: W is packed once, the rows of C are split among the threads.
void gemm_packed_parallel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* W, int64_t ldw, float* C, int64_t ldc) {
  std::vector<float> packed(((N + kCols - 1) / kCols) * K * kCols);
  pack_columns(W, ldw, K, 0, N, packed.data());
  at::parallel_for(0, (M + kRows - 1) / kRows, 16, [&](int64_t q0, int64_t q1) {
    const int64_t m0 = q0 * kRows, m1 = std::min(M, q1 * kRows);
    gemm_acc_packed(m1 - m0, K, A + m0 * lda, lda, packed.data(), 0, N, C + m0 * ldc, ldc);
  });
}
#endif  // GRULAB_PACKED

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
  Tensor out = at::empty({Tn, B, H}, opts);                    // (T, B, H)
  Tensor saved = at::empty({save ? Tn : 1, B, 4 * H}, opts);   // (T, B, 4H)

#ifdef GRULAB_PACKED
  // The packed-weight fast path. Not for B = 1: a tile always computes 4 rows,
  // and one row is a matrix-vector product, which small_linear does better.
  if (x.scalar_type() == at::kFloat && reset_after && B > 1) {
    Tensor bias = at::zeros({4 * H}, opts);  // [b_ir + b_hr | b_iz + b_hz | b_in | b_hn]
    if (b_ih.defined()) bias.narrow(0, 0, 3 * H).add_(b_ih);
    if (b_hh.defined()) {
      bias.narrow(0, 0, 2 * H).add_(b_hh.narrow(0, 0, 2 * H));
      bias.narrow(0, 3 * H, H).add_(b_hh.narrow(0, 2 * H, H));
    }
    forward_packed(x.data_ptr<float>(), h0.data_ptr<float>(), w_ih.data_ptr<float>(),
                   w_hh.data_ptr<float>(), bias.data_ptr<float>(), Tn, B, I, H, save,
                   out.data_ptr<float>(), saved.data_ptr<float>());
    return {out, out[Tn - 1].clone(), saved};
  }
#endif

  // Input projections of all steps in one GEMM.
  Tensor gx = scratch(kGx, {Tn, B, 3 * H}, opts);  // (T, B, 3H)
  Tensor gx2 = gx.view({Tn * B, 3 * H});        // (T*B, 3H)
  linear(x.view({Tn * B, I}), w_ih, b_ih, gx2);
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

// Type-generic entry points for backward_loop<T>: float goes to the packed
// kernels, double never gets there (kHavePacked is checked first).
#ifdef GRULAB_PACKED
constexpr bool kHavePacked = true;
inline void pack_columns_any(const float* w, int64_t ldw, int64_t K, int64_t j0, int64_t j1,
                             float* packed) {
  pack_columns(w, ldw, K, j0, j1, packed);
}
inline void gemm_acc_packed_any(int64_t M, int64_t K, const float* A, int64_t lda,
                                const float* packed, int64_t j0, int64_t j1, float* C,
                                int64_t ldc) {
  gemm_acc_packed(M, K, A, lda, packed, j0, j1, C, ldc);
}
#else
constexpr bool kHavePacked = false;
inline void pack_columns_any(const float*, int64_t, int64_t, int64_t, int64_t, float*) {}
inline void gemm_acc_packed_any(int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                                int64_t, float*, int64_t) {}
#endif
inline void pack_columns_any(const double*, int64_t, int64_t, int64_t, int64_t, double*) {}
inline void gemm_acc_packed_any(int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                                int64_t, double*, int64_t) {}

// ---------------------------------------------------------------------------
// Backward time loop. Threads split the hidden units again: thread k computes
// the gate gradients of its units, and after a barrier (the GEMM needs the
// whole dG_h row) its columns of dL/dh_{t-1} = d ⊙ z + dG_h W_hh. On the packed
// path (float32, reset_after) the GEMM's column panels go through a PanelQueue
// instead, and a second barrier ends the step.
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
  // float32, reset_after: all columns of W_hh packed into panels of kCols units,
  // each thread packing its home range; the per-step GEMM is shared panel by
  // panel through a PanelQueue (see forward_packed).
  constexpr bool kPackedPath = std::is_same<T, float>::value && kHavePacked;
  const bool packed = kPackedPath && reset_after;
  const int64_t P = (H + kCols - 1) / kCols;
  PanelQueue queue(P, nt);
  Tensor w_cols_t = packed ? scratch(kPackCols, {P * 3 * H * kCols}, at::kFloat) : Tensor();
  T* const w_cols = packed ? reinterpret_cast<T*>(w_cols_t.data_ptr<float>()) : nullptr;
#pragma omp parallel num_threads(nt)
  {
    const int k = omp_get_thread_num(), nk = omp_get_num_threads();
    int64_t j0, j1;
    hidden_slice(H, nk, k, j0, j1);
    const int64_t hk = j1 - j0;
    if (packed) {
      const int64_t u0 = queue.home_lo(k) * kCols, u1 = std::min(H, queue.home_hi(k) * kCols);
      if (u1 > u0) pack_columns_any(w_hh, H, 3 * H, u0, u1, w_cols + queue.home_lo(k) * 3 * H * kCols);
#pragma omp barrier  // a thread may take panels that another one packed
    }

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
        if (packed) {
          // dhp[:, u0:u1] (B, 16) += dG_h (B, 3H) @ W_hh[:, u0:u1] (3H, 16), panel by panel
          if (k == 0) queue.reset((Tn - t) % 2);
          queue.run((Tn - 1 - t) % 2, k, [&](int64_t p) {
            const int64_t u0 = p * kCols, u1 = std::min(H, u0 + kCols);
            gemm_acc_packed_any(B, 3 * H, dght, 3 * H, w_cols + p * 3 * H * kCols, u0, u1, dhp, H);
          });
#pragma omp barrier  // the next step's gate pass reads its units of dhp, done by any thread
        } else {
          // dhp[:, j0:j1] (B, hk) += dG_h (B, 3H) @ W_hh[:, j0:j1] (3H, hk)
          gemm_serial<T>(false, false, B, hk, 3 * H, dght, 3 * H, w_hh + j0, H, T(1), dhp + j0, H);
        }
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
  Tensor dgx = scratch(kDgx, {Tn, B, 3 * H}, opts);  // (T, B, 3H) dL/d(x-side pre-activations)
  Tensor dgh = reset_after ? scratch(kDgh, {Tn, B, 3 * H}, opts) : dgx;  // (T, B, 3H) hidden side

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
#ifdef GRULAB_PACKED
    if (x.scalar_type() == at::kFloat) {
      // (T*B, I) = (T*B, 3H) @ (3H, I) with the packed tile: with I as small as
      // 28, MKL ran this at under half of the machine's rate.
      dx = at::zeros({Tn * B, I}, opts);
      gemm_packed_parallel(Tn * B, I, 3 * H, dgx.data_ptr<float>(), 3 * H,
                           w_ih.contiguous().data_ptr<float>(), I, dx.data_ptr<float>(), I);
    }
#endif
    if (!dx.defined()) {
      dx = at::empty({Tn * B, I}, opts);
      gemm(dgx2, w_ih, dx, 0.0);  // (T*B, I) = (T*B, 3H) @ (3H, I)
    }
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
  m.def("release_scratch", &release_scratch, "free the calling thread's kept scratch buffers");
}
