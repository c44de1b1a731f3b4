// Backward glue of the native GRU: the time loop (loops.inc) in chunks of steps,
// and after each chunk its share of every weight gradient as one batched GEMM.
#include "native.h"

namespace grulab {

// Whether the first step's term dA_0^T p0 of a hidden weight gradient is zero however it is
// summed: p0 (contiguous) all ±0 and dA_0 (rows of `cols` with row length ld) all finite
// (0 · Inf and 0 · NaN are NaN, as torch.nn.GRU's sum gives them). The common case: a
// sequence started from h0 = 0, where the term's GEMM (K = B) is ~1/T of dW_hh's work.
template <typename T>
static bool first_term_zero(const T* p0, int64_t n, const T* dA, int64_t rows, int64_t cols, int64_t ld) {
  if (!all_zero(p0, n)) return false;
  T acc = 0;  // x · 0 is 0 for a finite x, NaN otherwise
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = dA + r * ld;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < cols; ++c) acc += a[c] * T(0);
  }
  return acc == T(0);
}

static bool first_term_zero(const Tensor& p0, const Tensor& dA0) {  // p0 (B, H), dA0 (B, N) rows of dg
  const int64_t rows = dA0.size(0), cols = dA0.size(1), ld = dA0.stride(0);
  if (p0.scalar_type() == at::kFloat)
    return first_term_zero(p0.data_ptr<float>(), p0.numel(), dA0.data_ptr<float>(), rows, cols, ld);
  return first_term_zero(p0.data_ptr<double>(), p0.numel(), dA0.data_ptr<double>(), rows, cols, ld);
}

// Weight gradient of a hidden-side block: dW (N, H) = beta dW + Σ_t dA_t^T P_t, where
// P_0 = p0 (B, H) and P_t = p_rest[t-1] for t >= 1: two GEMMs, no concatenation, or one
// where p0 is the step just before p_rest in memory (every chunk but the first: out[t0-1])
// or where P_0's term is zero (first_term_zero).
static void hidden_weight_grad(const Tensor& dA, const Tensor& p0, const Tensor& p_rest, Tensor& dW,
                               double beta) {
  const int64_t Tn = dA.size(0), B = dA.size(1), N = dA.size(2);
  const int64_t H = p0.size(1);
  if (Tn > 1 && p0.is_contiguous() && p_rest.is_contiguous() &&
      static_cast<const char*>(p0.data_ptr()) + p0.nbytes() == p_rest.data_ptr()) {
    Tensor p = at::from_blob(p0.data_ptr(), {Tn * B, H}, p0.options());  // (Tn*B, H) = [p0; p_rest]
    gemm(dA.reshape({Tn * B, N}).t(), p, dW, beta);  // (N, H) = (N, Tn*B) @ (Tn*B, H)
    return;
  }
  const bool skip0 = first_term_zero(p0, dA[0]);
  if (!skip0) gemm(dA[0].t(), p0, dW, beta);  // (N, H) = (N, B) @ (B, H)
  if (Tn > 1) {
    Tensor dA_rest = dA.narrow(0, 1, Tn - 1).reshape({(Tn - 1) * B, N});    // ((T-1)B, N)
    Tensor p = p_rest.reshape({(Tn - 1) * B, p_rest.size(2)});             // ((T-1)B, H)
    gemm(dA_rest.t(), p, dW, skip0 ? beta : 1.0);  // (N, H) += (N, (T-1)B) @ ((T-1)B, H)
  } else if (skip0 && beta == 0.0) {
    dW.zero_();
  }
}

// OpenMP's thread count for the calling thread (its nthreads ICV) while one lives: `threads` if > 0.
struct OmpThreads {
  int previous;
  explicit OmpThreads(int64_t threads) : previous(omp_get_max_threads()) {
    if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  }
  ~OmpThreads() { omp_set_num_threads(previous); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;
};

// A chunk's share of the weight gradients and dX in bf16 (BackwardPlan::bf16): each product one
// bf16 GEMM of torch's (oneDNN: float32 sums inside, AMX where the CPU has it, AVX512-BF16
// else), its result rounded once to bf16 and added to the float32 gradient (beta 0: set).
// dgb (n*B, gsb) bf16 gate gradients in the loop's layout; x_c (n*B, I); hprev (B, H)
// h_{t0-1}, out_prev (n-1, B, H); saved_c (n, B, 4H) (reset_after=False: its c = r ⊙ h_{t-1}).
static void chunk_grads_bf16(const Tensor& dgb, const Tensor& x_c, const Tensor& w_ih, const Tensor& hprev,
                             const Tensor& out_prev, const Tensor& saved_c, bool reset_after, Tensor dx_c,
                             Tensor& dw_ih, Tensor& dw_hh, double beta, Tensor& w_ihb) {
  const int64_t nB = dgb.size(0), H = hprev.size(1), B = hprev.size(0);
  const auto bf16 = hprev.options().dtype(at::kBFloat16);
  auto add = [&](Tensor dst, const Tensor& prod, double b) {
    if (b == 0.0) {
      dst.copy_(prod);
    } else {
      dst.add_(prod);
    }
  };
  if (!w_ihb.defined()) w_ihb = w_ih.to(at::kBFloat16);  // (3H, I)
  const Tensor xb = x_c.to(at::kBFloat16);                 // (n*B, I)
  // dG_x's gate blocks: reset_after [r z | gap | n] (columns [0, 2H) and [3H, 4H)), else [r z n].
  const Tensor gx_rz = dgb.narrow(1, 0, 2 * H), gx_n = dgb.narrow(1, reset_after ? 3 * H : 2 * H, H);
  if (dx_c.defined()) {  // (n*B, I) = dG_x (n*B, 3H) @ W_ih (3H, I)
    dx_c.copy_(at::mm(gx_rz, w_ihb.narrow(0, 0, 2 * H)));
    dx_c.add_(at::mm(gx_n, w_ihb.narrow(0, 2 * H, H)));
  }
  add(dw_ih.narrow(0, 0, 2 * H), at::mm(gx_rz.t(), xb), beta);  // (2H, I) += (2H, n*B) @ (n*B, I)
  add(dw_ih.narrow(0, 2 * H, H), at::mm(gx_n.t(), xb), beta);   // (H, I)
  Tensor hb = at::empty({nB, H}, bf16);  // (n*B, H) [h_{t0-1}; h_{t0} .. h_{t1-2}] in bf16
  hb.narrow(0, 0, B).copy_(hprev);
  if (nB > B) hb.narrow(0, B, nB - B).copy_(out_prev.reshape({nB - B, H}));
  if (reset_after) {  // (3H, H) += dG_h^T (3H, n*B) @ H_prev (n*B, H)
    add(dw_hh, at::mm(dgb.narrow(1, 0, 3 * H).t(), hb), beta);
  } else {
    add(dw_hh.narrow(0, 0, 2 * H), at::mm(gx_rz.t(), hb), beta);  // (2H, H)
    const Tensor rh = saved_c.narrow(2, 3 * H, H).reshape({nB, H}).to(at::kBFloat16);  // (n*B, H) r ⊙ h_{t-1}
    add(dw_hh.narrow(0, 2 * H, H), at::mm(gx_n.t(), rh), beta);  // (H, H)
  }
}

// Steps per chunk. The time loop runs over chunks of steps, from the last chunk
// to the first, and the weight gradients are summed chunk by chunk, so the
// gradient buffer holds one chunk, not the whole sequence: at (B, T, H) =
// (128, 200, 1024) two whole-sequence (T, B, 3H) buffers were 630 MB of fresh
// memory every call (300,000 page faults), and the GEMMs read them back from
// DRAM. Where 6H floats per row (what the two buffers took before the (B, 4H)
// layout: loops.inc) of at least 4 steps fit in one core's L2, a chunk is as many
// steps as fit: the weight GEMMs then read what the loop just wrote from L2 (on
// Sapphire Rapids, 2 MiB of L2: backward 0.85-0.90x of one whole-sequence chunk
// at B = 16..64, H = 256..512, and less sensitive to what ran before it; at
// (32, 35, 28, 256) chunks of 12 or 18 steps were 1.01-1.03x of these 10). Else a chunk
// is about 8 Mi elements of (B, 3H) rows, with at least 2048 rows (steps · B) so
// that the weight GEMMs stay efficient. The chunks are then made equal (T = 35
// in chunks of at most 10: 9, 9, 9, 8 rather than 10, 10, 10, 5).
int64_t chunk_steps(int64_t Tn, int64_t B, int64_t H, int64_t elem_bytes, bool fit_l2) {
  const int64_t in_l2 = fit_l2 ? l2_bytes() / (2 * B * 3 * H * elem_bytes) : 0;  // 0 where L2 is unknown
  const int64_t by_size = (int64_t(8) << 20) / (B * 3 * H), by_rows = (2048 + B - 1) / B;
  const int64_t most = in_l2 >= 4 ? std::min(in_l2, Tn) : std::clamp<int64_t>(std::max(by_size, by_rows), 1, Tn);
  const int64_t chunks = (Tn + most - 1) / most;
  return (Tn + chunks - 1) / chunks;
}

// Returns [dx, dh0, dw_ih, dw_hh, db_ih, db_hh] (undefined -> None where not needed).
// chunk: steps per chunk of the time loop (0: chunk_steps' choice; tests pass small ones).
std::vector<Tensor> gru_backward(const std::optional<Tensor>& grad_out_,
                                 const std::optional<Tensor>& grad_hT_, const Tensor& x_,
                                 const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                 const Tensor& out_, const Tensor& saved_, bool reset_after,
                                 bool has_b_ih, bool has_b_hh, bool need_x, bool need_h0,
                                 const std::string& isa, int64_t threads, int64_t chunk) {
  const IsaOps& ops = ops_for(isa);
  const BlasThreads blas_threads(threads);
  TORCH_CHECK(x_.dim() == 3 && h0.dim() == 2 && x_.size(0) > 0,
              "grulab native GRU backward: x must be (T, B, I) with T > 0 and h0 (B, H)");
  check_native_args(x_, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  // Every pointer below is read with the contiguous strides: x as (T*B, I) rows by the dW_ih
  // tile and the GEMMs (a view sliced in its last dimension has rows of another length),
  // out and saved by the time loop. A contiguous tensor is not copied.
  const Tensor x = x_.contiguous(), out = out_.contiguous(), saved = saved_.contiguous();
  const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(1);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({Tn, B, H}) && saved.size(0) == Tn && saved.size(1) == B &&
              saved.size(2) == 4 * H && out.scalar_type() == x.scalar_type() &&
              saved.scalar_type() == x.scalar_type(),
              "grulab native GRU backward: out must be (T, B, H) and saved (T, B, 4H) of x's dtype, got ",
              out.sizes(), " and ", saved.sizes());
  TORCH_CHECK(chunk >= 0, "grulab native GRU: chunk must be >= 0 (0: chosen by size), got ", chunk);
  const auto opts = x.options();
  // A gradient that is the same at every step (stride 0 over time: out.sum()'s, or none at
  // all) is passed as one (1, B, H) slice that the loop reads at every step (go_step = 0).
  TORCH_CHECK(!grad_out_ || (grad_out_->sizes() == at::IntArrayRef({Tn, B, H}) &&
                             grad_out_->scalar_type() == x.scalar_type()),
              "grulab native GRU backward: grad_out must be (T, B, H) of x's dtype, got ", grad_out_->sizes());
  TORCH_CHECK(!grad_hT_ || (grad_hT_->sizes() == at::IntArrayRef({B, H}) &&
                            grad_hT_->scalar_type() == x.scalar_type()),
              "grulab native GRU backward: grad_hT must be (B, H) of x's dtype, got ", grad_hT_->sizes());
  const Tensor grad_out = !grad_out_                  ? at::zeros({1, B, H}, opts)
                          : grad_out_->stride(0) == 0 ? grad_out_->narrow(0, 0, 1).contiguous()
                                                      : grad_out_->contiguous();
  const int64_t go_step = grad_out.size(0) == 1 ? 0 : B * H;
  Tensor dh = grad_hT_ ? grad_hT_->clone(at::MemoryFormat::Contiguous)
                       : at::zeros({B, H}, opts);   // (B, H) dL/dh_T, then dL/dh at each chunk's start
  const bool is_float = x.scalar_type() == at::kFloat;
  const BackwardPlan plan = backward_plan(ops, is_float, Tn, B, I, H, reset_after, need_x,
                                          has_b_ih || has_b_hh, threads, chunk);
  const int64_t Tc = plan.chunk;
  // (Tc, B, gs) [da_r | da_z | da_n ⊙ r | da_n], reset_after (dG_h its first 3H columns, dG_x
  // its first 2H and columns [3H, 4H): loops.inc); else [da_r | da_z | da_n] = dG_h = dG_x.
  // A row whose length is a multiple of 1 KiB gets one more cache line: the per-step GEMM
  // reads 8 rows at once, and 4 KiB apart (H = 256) they fell in the same L1 sets (loop
  // 0.98x with the pad on Sapphire Rapids).
  const int64_t used = reset_after ? 4 * H : 3 * H, elem = x.element_size();
  const int64_t gs = used * elem % 1024 == 0 ? used + 64 / elem : used;
  Tensor dg = scratch(kDg, {Tc, B, gs}, opts);
  // bf16: the loop writes each gate gradient row a second time, rounded to bf16, into dgb (same
  // layout, its own pad), which its per-step GEMMs and the chunk's GEMMs below read.
  const int64_t gsb = used * 2 % 1024 == 0 ? used + 32 : used;
  Tensor dgb = plan.bf16 ? scratch(kDgBf16, {Tc * B + kTileRowSlack, gsb}, opts.dtype(at::kBFloat16))
                        : Tensor();  // (Tc*B, gsb) and kTileRowSlack rows (native.h)
  uint16_t* const dgb_ptr = plan.bf16 ? reinterpret_cast<uint16_t*>(dgb.data_ptr()) : nullptr;

  const Tensor h0c = h0.contiguous(), w_hhc = w_hh.contiguous(), w_ihc = w_ih.contiguous();
  const int nt = plan.threads;
  // [Σ da_r | Σ da_z | Σ da_n | Σ da_n ⊙ r] over t and b, added to by the loop as it goes.
  Tensor db = (has_b_ih || has_b_hh) ? at::zeros({4 * H}, opts) : Tensor();
  const bool packed = plan.packed, by_rows = plan.by_rows, blocked = plan.blocked_bias;
  Tensor db_part = blocked ? scratch(kDbPart, {Tc, (B + kRowBlock - 1) / kRowBlock, 4 * H}, opts) : Tensor();
  Tensor w_cols = packed ? scratch(kPackCols, {(H + ops.cols - 1) / ops.cols * 3 * H * ops.cols}, opts)
                         : Tensor();
  const bool dx_packed = plan.dx_packed, dw_ih_narrow = plan.dw_ih_narrow;
  Tensor dx = !need_x ? Tensor() : dx_packed ? at::zeros({Tn, B, I}, opts) : at::empty({Tn, B, I}, opts);
  const int gemm_nt = threads > 0 ? static_cast<int>(threads) : at::get_num_threads();
  Tensor dw_ih = dw_ih_narrow ? at::zeros({3 * H, I}, opts) : at::empty({3 * H, I}, opts);
  Tensor dw_hh = at::empty({3 * H, H}, opts);

  Tensor w_ihb;  // bf16: W_ih rounded to bf16 once (chunk_grads_bf16)
  for (int64_t t1 = Tn; t1 > 0;) {  // the chunk of steps [t0, t1), last chunk first
    const int64_t t0 = std::max<int64_t>(0, t1 - Tc), n = t1 - t0;
    const double beta = t1 == Tn ? 0.0 : 1.0;             // the first chunk sets the weight gradients
    const Tensor hprev = t0 == 0 ? h0c : out[t0 - 1];    // (B, H) h_{t0-1}
    const bool need_dh = t0 > 0 || need_h0;               // dL/dh_{t0-1}: the next chunk's input
    if (is_float) {
      ops.backward_loop_f(grad_out.data_ptr<float>() + t0 * go_step, go_step, dh.data_ptr<float>(),
                          hprev.data_ptr<float>(), w_hhc.data_ptr<float>(),
                          out.data_ptr<float>() + t0 * B * H, saved.data_ptr<float>() + t0 * B * 4 * H,
                          n, B, H, reset_after, need_dh, dg.data_ptr<float>(), gs,
                          db.defined() ? db.data_ptr<float>() : nullptr,
                          db_part.defined() ? db_part.data_ptr<float>() : nullptr,
                          packed ? w_cols.data_ptr<float>() : nullptr, t1 < Tn, by_rows, nt, dgb_ptr, gsb);
    } else {
      ops.backward_loop_d(grad_out.data_ptr<double>() + t0 * go_step, go_step, dh.data_ptr<double>(),
                          hprev.data_ptr<double>(), w_hhc.data_ptr<double>(),
                          out.data_ptr<double>() + t0 * B * H, saved.data_ptr<double>() + t0 * B * 4 * H,
                          n, B, H, reset_after, need_dh, dg.data_ptr<double>(), gs,
                          db.defined() ? db.data_ptr<double>() : nullptr,
                          db_part.defined() ? db_part.data_ptr<double>() : nullptr, nullptr, t1 < Tn,
                          false, nt, nullptr, 0);
    }

    // This chunk's share of the gradients batched over time: one GEMM each. dG_x is
    // (n*B, 3H) = dg's columns [0, 2H) and [3H, 4H) where reset_after (`gap` = H floats
    // between its z and n gates), else its first 3H.
    const Tensor dg2 = dg.narrow(0, 0, n).view({n * B, gs});  // (n*B, gs)
    const int64_t gap = reset_after ? H : 0, split = reset_after ? 2 * H : 3 * H;
    auto dg_x = [&](int64_t g0, int64_t units) {  // (n*B, units): dG_x's gates from unit g0
      return dg2.narrow(1, g0 + (g0 >= 2 * H ? gap : 0), units);
    };
    const Tensor x_c = x.narrow(0, t0, n).reshape({n * B, I});  // (n*B, I)
    if (plan.bf16) {
      // torch's bf16 matmuls (oneDNN) and conversions take their thread count from OpenMP's
      // setting for this thread: the governor's count while they run (MKL's BlasThreads has no say)
      const OmpThreads omp_threads(threads);
      chunk_grads_bf16(dgb.narrow(0, 0, n * B), x_c, w_ihc, hprev, out.narrow(0, t0, n - 1),
                       saved.narrow(0, t0, n), reset_after, need_x ? dx.narrow(0, t0, n).view({n * B, I}) : Tensor(),
                       dw_ih, dw_hh, beta, w_ihb);
      t1 = t0;
      continue;
    }
    if (need_x) {
      Tensor dx_c = dx.narrow(0, t0, n).view({n * B, I});  // (n*B, I) = dG_x (n*B, 3H) @ W_ih (3H, I)
      if (dx_packed) {
        ops.gemm_packed_parallel(n * B, I, 3 * H, dg2.data_ptr<float>(), gs, false, split, gap,
                                 w_ihc.data_ptr<float>(), I, dx_c.data_ptr<float>(), I, gemm_nt);
      } else if (gap == 0) {
        gemm_by_rows(dg_x(0, 3 * H), w_ihc, dx_c, 0.0, gemm_nt);
      } else {  // gates r, z, then n
        gemm_by_rows(dg_x(0, 2 * H), w_ihc.narrow(0, 0, 2 * H), dx_c, 0.0, gemm_nt);
        gemm_by_rows(dg_x(2 * H, H), w_ihc.narrow(0, 2 * H, H), dx_c, 1.0, gemm_nt);
      }
    }
    if (dw_ih_narrow) {  // (3H, I) += dG_x^T (3H, n*B) @ (n*B, I), dG_x read in place as A^T
      ops.gemm_packed_parallel(3 * H, I, n * B, dg2.data_ptr<float>(), gs, true, split, gap,
                               x_c.data_ptr<float>(), I, dw_ih.data_ptr<float>(), I, gemm_nt);
    } else if (gap == 0) {
      gemm(dg_x(0, 3 * H).t(), x_c, dw_ih, beta);  // (3H, I) += (3H, n*B) @ (n*B, I)
    } else {  // gates r, z, then n
      Tensor dw_rz = dw_ih.narrow(0, 0, 2 * H), dw_n = dw_ih.narrow(0, 2 * H, H);
      gemm(dg_x(0, 2 * H).t(), x_c, dw_rz, beta);  // (2H, I) += (2H, n*B) @ (n*B, I)
      gemm(dg_x(2 * H, H).t(), x_c, dw_n, beta);   // (H, I)
    }
    const Tensor dg_c = dg.narrow(0, 0, n);            // (n, B, gs)
    const Tensor out_prev = out.narrow(0, t0, n - 1);  // (n-1, B, H) = h_{t0} .. h_{t1-2}
    if (reset_after) {
      hidden_weight_grad(dg_c.narrow(2, 0, 3 * H), hprev, out_prev, dw_hh, beta);  // (3H, H)
    } else {
      Tensor dw_rz = dw_hh.narrow(0, 0, 2 * H), dw_n = dw_hh.narrow(0, 2 * H, H);
      hidden_weight_grad(dg_c.narrow(2, 0, 2 * H), hprev, out_prev, dw_rz, beta);  // (2H, H)
      Tensor rh = saved.narrow(0, t0, n).narrow(2, 3 * H, H).reshape({n * B, H});  // (n*B, H) r ⊙ h_{t-1}
      Tensor da_n = dg_c.narrow(2, 2 * H, H).reshape({n * B, H});                   // (n*B, H)
      gemm(da_n.t(), rh, dw_n, beta);                                               // (H, H)
    }
    t1 = t0;
  }
  Tensor db_ih = has_b_ih ? db.narrow(0, 0, 3 * H) : Tensor();  // (3H,) Σ dG_x
  Tensor db_hh;                                                   // (3H,) Σ dG_h (never db_ih's memory)
  if (has_b_hh && reset_after) db_hh = at::cat({db.narrow(0, 0, 2 * H), db.narrow(0, 3 * H, H)});
  if (has_b_hh && !reset_after) db_hh = has_b_ih ? db_ih.clone() : db.narrow(0, 0, 3 * H);
  return {dx, need_h0 ? dh : Tensor(), dw_ih, dw_hh, db_ih, db_hh};
}

}  // namespace grulab
