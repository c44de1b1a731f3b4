// The kernel side of grulab's native GRU: plain C++ on raw pointers, no torch
// headers. loops.inc holds the time loops and micro-kernels; it is compiled
// once per instruction set (isa_generic.cpp, isa_avx2.cpp, isa_avx512.cpp),
// each time with its own `#pragma GCC target`, into its own namespace, and the
// glue (forward.cpp, backward.cpp) picks one table of entry points at run
// time (cpu.cpp). One build therefore runs on any x86-64 CPU.
//
// Everything here is included BEFORE an ISA file's target pragma, so the
// inline functions below are compiled for the baseline x86-64 and may be
// inlined anywhere; only what loops.inc defines gets the wider instructions,
// and it has internal linkage, so no AVX code can leak into a baseline caller.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

// MKL's Fortran BLAS, exported by the torch wheel's libtorch_cpu. Weak, so that
// a torch built without it still loads this module (loops.inc then uses a plain loop).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace grulab {

constexpr int64_t kRows = 4;   // batch rows per register tile

// Split H hidden units among the threads: thread k owns units [j0, j1).
// Chunks are multiples of 8 so the vectorised loops start aligned to a lane.
inline void hidden_slice(int64_t H, int nthreads, int k, int64_t& j0, int64_t& j1) {
  int64_t chunk = (H + nthreads - 1) / nthreads;
  if (H >= 8 * nthreads) chunk = (chunk + 7) / 8 * 8;
  j0 = std::min<int64_t>(H, k * chunk);
  j1 = std::min<int64_t>(H, j0 + chunk);
}

// Batch rows go to threads (row_slice) and into the backward's blocks of bias
// sums (loops.inc) in multiples of this many rows, so no block straddles two threads.
constexpr int64_t kRowBlock = 4;

// Split B batch rows among the threads (the packed loops' other split, see
// split_rows in native.h): thread k owns rows [r0, r1), multiples of kRowBlock
// except the last slice, so that register tiles of 4 or 8 rows fill up.
inline void row_slice(int64_t B, int nthreads, int k, int64_t& r0, int64_t& r1) {
  auto edge = [&](int i) {
    return i == nthreads ? B : std::min<int64_t>(B, (B * i / nthreads + kRowBlock - 1) / kRowBlock * kRowBlock);
  };
  r0 = edge(k), r1 = edge(k + 1);
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
  // The panels thread k of a team of nk prepares (packs) before the steps: its home
  // range, or, where OpenMP gave a smaller team than planned (OMP_THREAD_LIMIT, a call
  // from inside another parallel region), an even share, so that every panel is done.
  void share(int k, int nk, int64_t& lo, int64_t& hi) const {
    const int64_t panels = hi_[n_ - 1];
    lo = nk == n_ ? lo_[k] : panels * k / nk;
    hi = nk == n_ ? hi_[k] : panels * (k + 1) / nk;
  }
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

// One instruction set's entry points (see loops.inc for what each computes).
// `packed` is true where the float32 packed-weight kernels exist (both forms;
// reset_after=False split by rows only, see native.h);
// the glue sizes their scratch with `panel` / `cols` (units per forward /
// backward panel: one and two SIMD registers of floats).
struct IsaOps {
  const char* name;
  bool packed;
  bool bf16;  // the bf16 table: forward_packed_bf and the backward's dgb path (loops_bf16.inc)
  int64_t panel, cols;
  int64_t rows;  // batch rows of the packed kernels' widest register tile (4, or 8 on AVX-512)
  void (*forward_packed)(const float* x, const float* h0, bool h0_zero, const float* w_ih, const float* w_hh,
                         const float* bias4, int64_t Tn, int64_t B, int64_t I, int64_t H,
                         bool save, bool reset_after, float* out, float* saved, float* pack_hh,
                         float* pack_ih, bool by_rows, int nt, const uint16_t* xb, int64_t Ip,
                         uint16_t* hbf, uint16_t* cbf);
  // The same with bf16 products (loops_forward.inc, kBf): null but in the bf16 table.
  void (*forward_packed_bf)(const float* x, const float* h0, bool h0_zero, const float* w_ih, const float* w_hh,
                            const float* bias4, int64_t Tn, int64_t B, int64_t I, int64_t H,
                            bool save, bool reset_after, float* out, float* saved, float* pack_hh,
                            float* pack_ih, bool by_rows, int nt, const uint16_t* xb, int64_t Ip,
                            uint16_t* hbf, uint16_t* cbf);
  void (*forward_loop_f)(const float* gx, const float* h0, const float* w_hh, const float* b_hh,
                         int64_t Tn, int64_t B, int64_t H, bool reset_after, bool save,
                         float* out, float* saved, int nt);
  void (*forward_loop_d)(const double* gx, const double* h0, const double* w_hh,
                         const double* b_hh, int64_t Tn, int64_t B, int64_t H, bool reset_after,
                         bool save, double* out, double* saved, int nt);
  void (*step_f)(const float* x, const float* h, const float* w_ih, const float* w_hh,
                 const float* b_ih, const float* b_hh, int64_t B, int64_t I, int64_t H,
                 bool reset_after, float* h_new, int nt);
  void (*step_d)(const double* x, const double* h, const double* w_ih, const double* w_hh,
                 const double* b_ih, const double* b_hh, int64_t B, int64_t I, int64_t H,
                 bool reset_after, double* h_new, int nt);
  void (*backward_loop_f)(const float* grad_out, int64_t go_step, float* dh, const float* h0,
                          const float* w_hh, const float* out, const float* saved, int64_t Tn,
                          int64_t B, int64_t H, bool reset_after, bool need_dh0, float* dg, int64_t ldg,
                          float* db, float* db_part, float* w_cols, bool w_cols_ready,
                          bool by_rows, int nt, uint16_t* dgb, int64_t ldgb);
  void (*backward_loop_d)(const double* grad_out, int64_t go_step, double* dh, const double* h0,
                          const double* w_hh, const double* out, const double* saved,
                          int64_t Tn, int64_t B, int64_t H, bool reset_after, bool need_dh0,
                          double* dg, int64_t ldg, double* db, double* db_part, double* w_cols,
                          bool w_cols_ready, bool by_rows, int nt, uint16_t* dgb, int64_t ldgb);
  // C (M, N) += A (M, K) @ W (K, N) on nt threads (packed tiles); a_t: A is stored
  // transposed, (K, M) with row length lda (then a narrow tile that packs nothing,
  // for small N). A's columns from `split` on (M's if a_t, else K's) are read `gap`
  // floats further along its rows (split = M or K: none). Null where !packed.
  void (*gemm_packed_parallel)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                               bool a_t, int64_t split, int64_t gap, const float* W, int64_t ldw,
                               float* C, int64_t ldc, int nt);
};

namespace generic { extern const IsaOps ops; }
namespace avx2 { extern const IsaOps ops; }
namespace avx512 { extern const IsaOps ops; }
namespace avx512bf16 { extern const IsaOps ops; }
namespace amx { extern const IsaOps ops; bool self_check(); }
namespace amx_emulated { extern const IsaOps ops; bool self_check(); }

// The table for `name` ("generic", "avx2", "avx512", "avx512bf16", "amx"; "amx-emulated" for
// tests), or null if this CPU cannot run it or the name is unknown (cpu.cpp).
const IsaOps* isa_ops(const char* name);
// Whether this CPU (and OS) can run `name`.
bool cpu_supports(const char* name);
// Why the amx table cannot run here ("" if it can): no AMX-BF16, the OS refused the tile
// state, or the tiles failed their self-check (cpu.cpp; decided once per process).
const char* amx_unavailable();

}  // namespace grulab
