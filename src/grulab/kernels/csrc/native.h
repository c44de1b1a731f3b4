// The torch side of the native GRU: tensors in, checks, scratch, the big
// batched GEMMs, and a call into one instruction set's loops (kernels.h).
#pragma once

#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace grulab {

using at::Tensor;

// Rows left after each bf16 row buffer that the loops read by tiles (x_t, h_{t-1}, r ⊙ h_{t-1},
// dG_h): an AMX tile reads 16 rows, the last ones past the caller's (loops_amx.inc).
constexpr int64_t kTileRowSlack = 16;

// Scratch buffers kept from call to call (scratch.cpp).
enum ScratchSlot { kGx = 0, kDg = 1, kPackHH = 2, kPackIH = 3, kPackCols = 4, kDbPart = 5, kDgBf16 = 6, kNumSlots = 7 };
Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opts);
void release_scratch();

// The kernel table for `isa`; raises a RuntimeError naming the CPU's choices if it cannot run.
const IsaOps& ops_for(const std::string& isa);

// Threads for the time loop: `threads` if > 0 (the caller's contention-aware
// choice, grulab.fused), else torch's intra-op count; 1 when a step is so small
// that a barrier per step costs more than it saves.
inline int loop_threads(int64_t B, int64_t H, int64_t threads = 0) {
  const int64_t macs_per_step = 3 * B * H * H;
  if (macs_per_step < (1 << 16)) return 1;
  const int64_t want = threads > 0 ? threads : at::get_num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, H / 8)));
}

// One core's L2 cache in bytes (sysconf, read once), or 0 where the system does not say.
inline int64_t l2_bytes() {
  static const int64_t l2 = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return l2;
}

// Whether `weight_floats` floats fit in one core's L2 (where the system does not say: no).
inline bool fits_l2(int64_t weight_floats) {
  const int64_t l2 = l2_bytes();
  return l2 > 0 && weight_floats * static_cast<int64_t>(sizeof(float)) <= l2;
}

// The notes' reset_after=False runs the packed loops (float32) split by rows only, whatever
// the thread count, so that which kernel runs does not depend on the governor's count (the
// same bits on 1 or 2 threads): where `weight_floats` (what the loop packs) fit in one core's
// L2 and there are kMinRowsResetBefore rows or more, a 4-row tile for each of two threads.
// At (B, T, I, H) = (4, 35, 28, 256) the packed forward took 1.12x the time loop's time, at
// B = 8 0.78x (Sapphire Rapids).
constexpr int64_t kMinRowsResetBefore = 8;
inline bool rows_reset_before(const IsaOps& ops, int64_t B, int64_t weight_floats) {
  return ops.packed && B >= kMinRowsResetBefore && fits_l2(weight_floats);
}

// The bf16 table runs reset_after=False split by rows from kMinRowsResetBeforeBf16 rows whether or
// not the weights fit in L2 (H even, as for every bf16 plan): each thread then streams the bf16
// weights (half of float32's bytes) from L3 every step, and still beat the float32 time loop that
// runs there otherwise (measured at (64, 100, 256, 1024) on AMD EPYC Zen 4: see benchmarks/results.md).
// Below 8 rows too, where the float32 kernel runs its time loop: from 2 rows the bf16 loops were
// faster (bench_bf16's few-rows table), while one row is one thread's work (0.95x fwd+bwd at
// (T, B, I, H) = (35, 1, 28, 256) on AMD EPYC Zen 4). The rule does not depend on the thread
// count, so the bits do not either.
constexpr int64_t kMinRowsResetBeforeBf16 = 2;
// Whether the bf16 table's packed loops take a call at all: float32 (under autocast, or bfloat16
// parameters on float32 copies) and H even (no padded pairs in the rows of h).
inline bool bf16_products(const IsaOps& ops, bool is_float, int64_t H) {
  return ops.bf16 && ops.packed && is_float && H % 2 == 0;
}
inline bool bf16_rows_reset_before(const IsaOps& ops, bool is_float, int64_t B, int64_t H) {
  return bf16_products(ops, is_float, H) && B >= kMinRowsResetBeforeBf16;
}

// The same for reset_after=True: the bf16 table splits the rows wherever every thread gets a full
// register tile of rows, whether or not the weights fit in L2 (split_rows' rule for float32).
inline bool bf16_split_rows(const IsaOps& ops, bool is_float, int64_t B, int64_t H, int nt) {
  return bf16_products(ops, is_float, H) && nt > 1 && ops.rows > 0 && B >= nt * ops.rows;
}

// Whether the packed time loops split the batch rows among the threads instead
// of the hidden units. Batch rows are independent, so a thread that owns rows
// runs all T steps without a barrier and reads only the h_{t-1} it wrote itself;
// split by units, every step ends at a barrier and half of h_{t-1} comes from the
// other core. But each thread then reads all the packed weights every step, not
// its share: rows only where every thread gets a full register tile of rows
// (ops.rows) and `weight_floats` fit in one core's L2 (sysconf; unknown: units).
inline bool split_rows(const IsaOps& ops, int64_t B, int64_t weight_floats, int nt) {
  return nt > 1 && ops.rows > 0 && B >= nt * ops.rows && fits_l2(weight_floats);
}

// What a forward call runs, decided in one place (forward.cpp runs it, plan() in bindings.cpp
// shows it). The packed-weight fast path is float32 only, and not for B = 1: a tile always
// computes 4 rows, and one row is a matrix-vector product, which the time loop does better. The
// bf16 table takes it at B = 1 as well: its panels are half the bytes, and the 4-row bf16 tile on
// one row tied the float32 time loop at (T, B, I, H) = (35, 1, 28, 256) and beat it by 1.14x at
// (64, 1, 76, 384) and 1.36x at (100, 1, 256, 1024) in the forward (AMD EPYC Zen 4, 2 threads).
struct ForwardPlan {
  int threads;   // threads of the time loop (loop_threads)
  bool by_rows;  // the packed loop splits batch rows, not hidden units (split_rows / rows_reset_before)
  bool packed;   // weights packed once per call into register panels (else a GEMM per step)
  bool bf16;     // the packed loop's products in bf16 (the bf16 table; H even: no padded pairs)
};
inline ForwardPlan forward_plan(const IsaOps& ops, bool is_float, int64_t B, int64_t I, int64_t H,
                                bool reset_after, int64_t threads) {
  ForwardPlan p;
  p.threads = loop_threads(B, H, threads);
  p.by_rows = reset_after ? split_rows(ops, B, 3 * H * (H + I), p.threads) || bf16_split_rows(ops, is_float, B, H, p.threads)
                          : rows_reset_before(ops, B, 3 * H * (H + I)) || bf16_rows_reset_before(ops, is_float, B, H);
  p.packed = ops.packed && is_float && (B > 1 || bf16_products(ops, is_float, H)) && (reset_after || p.by_rows);
  p.bf16 = p.packed && bf16_products(ops, is_float, H);
  return p;
}

// What a backward call runs (backward.cpp runs it, plan() shows it); chunk: steps per chunk
// asked for (0: chosen by size, chunk_steps).
struct BackwardPlan {
  int threads;        // threads of the time loop
  bool packed;        // W_hh packed into column panels for the per-step GEMM
  bool by_rows;       // the loop splits batch rows, not hidden units
  bool blocked_bias;  // bias sums by blocks of kRowBlock rows (the same bits on 1 or 2 threads)
  int64_t chunk;      // steps per chunk: the gradient buffer holds one chunk (chunk_steps)
  bool dx_packed;     // dX by the packed tile (else MKL)
  bool dw_ih_narrow;  // dW_ih by the narrow tile, I <= kNarrowDwIhMaxI (else MKL)
  bool bf16;          // bf16 operands: the per-step GEMM (bf16 panels) and the chunk's weight GEMMs and dX
                      // (torch's bf16 matmul, oneDNN: AMX where the CPU has it); the bf16 table, packed, H even
};
constexpr int64_t kNarrowDwIhMaxI = 64;  // dW_ih by our narrow tile up to this many inputs
int64_t chunk_steps(int64_t Tn, int64_t B, int64_t H, int64_t elem_bytes, bool fit_l2 = true);
inline BackwardPlan backward_plan(const IsaOps& ops, bool is_float, int64_t Tn, int64_t B, int64_t I,
                                  int64_t H, bool reset_after, bool need_x, bool has_bias,
                                  int64_t threads, int64_t chunk) {
  BackwardPlan p;
  p.threads = loop_threads(B, H, threads);
  // The packed path (float32) packs all columns of W_hh into panels of ops.cols units. The
  // notes' reset_after=False takes it split by rows only, as the forward does.
  const bool rows_rb = !reset_after && is_float &&
                       (rows_reset_before(ops, B, 3 * H * H) || bf16_rows_reset_before(ops, is_float, B, H));
  p.packed = is_float && ops.packed && (reset_after || rows_rb);
  p.by_rows = reset_after ? p.packed && (split_rows(ops, B, 3 * H * H, p.threads) ||
                                         bf16_split_rows(ops, is_float, B, H, p.threads))
                          : rows_rb;
  // Where the loop may split the rows at some thread count (the governor picks 1 or 2), each
  // step's bias sums go by blocks of kRowBlock rows, added up in a fixed order (loops.inc), so
  // that they are the same bits whichever split and count run; elsewhere over whole steps.
  p.blocked_bias = has_bias && (reset_after ? p.packed && (split_rows(ops, B, 3 * H * H, 2) ||
                                                           bf16_split_rows(ops, is_float, B, H, 2))
                                            : rows_rb);
  p.chunk = chunk > 0 ? std::min(chunk, Tn) : chunk_steps(Tn, B, H, is_float ? 4 : 8);
  // dX with the packed tile where there is one: with I as small as 28, MKL ran this
  // (T*B, I) = (T*B, 3H) @ (3H, I) GEMM at under half of the machine's rate.
  p.dx_packed = need_x && is_float && ops.packed;
  // dW_ih by our own tile too where I is small (gemm_at_narrow, loops.inc): MKL ran
  // (3H, T*B) @ (T*B, 28) at ≈80 GFLOP/s; the tile reads dG_x in place, row by row, and
  // like every native GEMM here does not depend on the thread count.
  p.dw_ih_narrow = is_float && ops.packed && I <= kNarrowDwIhMaxI;
  p.bf16 = p.packed && bf16_products(ops, is_float, H);
  if (p.bf16) p.dx_packed = p.dw_ih_narrow = false;
  // bf16: chunks by size only (chunk_steps without its L2 rule): the weight GEMMs are oneDNN
  // calls, a few per chunk, and at (32, 35, 28, 256) L2-sized chunks of 5 steps made 7 rounds of them.
  if (p.bf16 && chunk <= 0) p.chunk = chunk_steps(Tn, B, H, 2, false);
  return p;
}

// MKL's thread count for the calling thread while a BlasThreads lives: `threads` if > 0
// (the governor's count, grulab.threads), else untouched. Without it a call the governor
// runs on 1 thread because another process holds a core still handed its weight GEMMs to
// all of torch's threads, which then waited for the busy core: fwd+bwd at (32, 35, 28, 256)
// beside one busy process took 2.7-3.0x its quiet time on Sapphire Rapids, 1.8-2.2x with
// torch.set_num_threads(1). A no-op where torch's BLAS is not MKL (the symbol is weak).
// (MKL_Set_Num_Threads_Local is the C entry point that mkl_service.h's lower-case name
// stands for; libtorch_cpu's lower-case symbol is the Fortran one, which takes an int*.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
struct BlasThreads {
  int previous = -1;  // MKL's previous thread-local count (0: its global one)
  explicit BlasThreads(int64_t threads) {
    if (threads > 0 && MKL_Set_Num_Threads_Local)
      previous = MKL_Set_Num_Threads_Local(static_cast<int>(threads));
  }
  ~BlasThreads() {
    if (previous >= 0) MKL_Set_Num_Threads_Local(previous);
  }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;
};

// Whether every element of p[0, n) is ±0 (a NaN is not): h0 = 0 lets the forward skip step
// 0's hidden-side products and the backward dW_hh's first term, where no Inf or NaN meets it.
template <typename T>
inline bool all_zero(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (p[i] != T(0)) return false;
  return true;
}

// C = beta * C + A @ B on 2-D (possibly strided / transposed) views, MKL's threads (BlasThreads).
inline void gemm(const Tensor& A, const Tensor& B, Tensor& C, double beta) {
  if (C.numel() == 0) return;
  if (beta == 0.0) {
    at::mm_out(C, A, B);
  } else {
    C.addmm_(A, B, beta, 1.0);
  }
}

// Checks every argument (CPU, one floating dtype, shapes, no zero size: the loops divide by
// the batch; grulab.fused runs zero sizes on its torch tier). Any strided layout is accepted:
// the glue copies what is not contiguous (a contiguous tensor costs nothing).
// C = beta * C + A @ B like gemm(), in blocks of kRowBlockGemm rows of C: each block one
// single-threaded GEMM, the blocks shared among nt threads. Each row's sums are then the same
// whatever nt is (MKL's own threading of a whole GEMM changed their last bits with the thread
// count on AMD EPYC Zen 4), so the governor's choice of 1 or 2 threads changes no result.
// For the row-wise GEMMs where no tile of ours runs (float64, the generic loops).
constexpr int64_t kRowBlockGemm = 64;
// The OpenMP threads start with their own thread-local state (grad mode on), so each block runs
// below autograd, and an error is carried out of the parallel region (an exception escaping it
// would end the process).
inline void gemm_by_rows(const Tensor& A, const Tensor& B, Tensor& C, double beta, int nt) {
  const int64_t rows = C.size(0), blocks = (rows + kRowBlockGemm - 1) / kRowBlockGemm;
  if (C.numel() == 0) return;
  std::exception_ptr error;
#pragma omp parallel for num_threads(std::max<int64_t>(1, std::min<int64_t>(nt, blocks))) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    try {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const BlasThreads one(1);
      const int64_t r0 = blk * kRowBlockGemm, n = std::min(kRowBlockGemm, rows - r0);
      Tensor c = C.narrow(0, r0, n);
      gemm(A.narrow(0, r0, n), B, c, beta);
    } catch (...) {
#pragma omp critical(grulab_gemm_by_rows)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

void check_native_args(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                       const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh);

std::vector<Tensor> gru_forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                const std::optional<Tensor>& b_hh, bool reset_after, bool save,
                                const std::string& isa, int64_t threads);
Tensor gru_step(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                bool reset_after, const std::string& isa);
std::vector<Tensor> gru_backward(const std::optional<Tensor>& grad_out,
                                 const std::optional<Tensor>& grad_hT, const Tensor& x,
                                 const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                 const Tensor& out, const Tensor& saved, bool reset_after,
                                 bool has_b_ih, bool has_b_hh, bool need_x, bool need_h0,
                                 const std::string& isa, int64_t threads, int64_t chunk);

}  // namespace grulab
