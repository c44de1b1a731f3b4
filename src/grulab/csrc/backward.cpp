// Backward glue of the native GRU: the time loop (loops.inc), then every
// weight gradient as one batched GEMM or reduction.
#include "native.h"

namespace grulab {

// Weight gradient of a hidden-side block: dW (N, H) = Σ_t dA_t^T P_t, where
// P_0 = p0 (B, H) and P_t = p_rest[t-1] for t >= 1 (two GEMMs, no concatenation).
static void hidden_weight_grad(const Tensor& dA, const Tensor& p0, const Tensor& p_rest, Tensor& dW) {
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
                                 bool has_b_ih, bool has_b_hh, bool need_x, bool need_h0,
                                 const std::string& isa, int64_t threads) {
  const IsaOps& ops = ops_for(isa);
  const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(1);
  const auto opts = x.options();
  // A gradient that is the same at every step (stride 0 over time: out.sum()'s, or none at
  // all) is passed as one (1, B, H) slice that the loop reads at every step (go_step = 0).
  const Tensor grad_out = !grad_out_                  ? at::zeros({1, B, H}, opts)
                          : grad_out_->stride(0) == 0 ? grad_out_->narrow(0, 0, 1).contiguous()
                                                      : grad_out_->contiguous();
  Tensor dh = grad_hT_ ? grad_hT_->clone(at::MemoryFormat::Contiguous)
                       : at::zeros({B, H}, opts);   // (B, H) dL/dh_T
  Tensor dgx = scratch(kDgx, {Tn, B, 3 * H}, opts);  // (T, B, 3H) dL/d(x-side pre-activations)
  Tensor dgh = reset_after ? scratch(kDgh, {Tn, B, 3 * H}, opts) : dgx;  // (T, B, 3H) hidden side

  const Tensor h0c = h0.contiguous(), w_hhc = w_hh.contiguous();
  const int nt = loop_threads(B, H, threads);
  const int64_t go_step = grad_out.size(0) == 1 ? 0 : B * H;
  // [Σ da_r | Σ da_z | Σ da_n | Σ da_n ⊙ r] over t and b, summed by the loop as it goes.
  Tensor db = (has_b_ih || has_b_hh) ? at::empty({4 * H}, opts) : Tensor();
  if (x.scalar_type() == at::kFloat) {
    // The packed path (float32, reset_after) packs all columns of W_hh into panels of ops.cols units.
    const bool packed = ops.packed && reset_after;
    Tensor w_cols = packed ? scratch(kPackCols, {(H + ops.cols - 1) / ops.cols * 3 * H * ops.cols}, opts)
                           : Tensor();
    ops.backward_loop_f(grad_out.data_ptr<float>(), go_step, dh.data_ptr<float>(),
                        h0c.data_ptr<float>(), w_hhc.data_ptr<float>(), out.data_ptr<float>(),
                        saved.data_ptr<float>(), Tn, B, H, reset_after, need_h0,
                        dgx.data_ptr<float>(), dgh.data_ptr<float>(),
                        db.defined() ? db.data_ptr<float>() : nullptr,
                        packed ? w_cols.data_ptr<float>() : nullptr, nt);
  } else {
    ops.backward_loop_d(grad_out.data_ptr<double>(), go_step, dh.data_ptr<double>(),
                        h0c.data_ptr<double>(), w_hhc.data_ptr<double>(), out.data_ptr<double>(),
                        saved.data_ptr<double>(), Tn, B, H, reset_after, need_h0,
                        dgx.data_ptr<double>(), dgh.data_ptr<double>(),
                        db.defined() ? db.data_ptr<double>() : nullptr, nullptr, nt);
  }

  // Everything batched over time: one GEMM or reduction each.
  Tensor dgx2 = dgx.view({Tn * B, 3 * H});  // (T*B, 3H)
  Tensor dx, dw_ih = at::empty({3 * H, I}, opts), dw_hh = at::empty({3 * H, H}, opts);
  if (need_x) {
    if (ops.packed && x.scalar_type() == at::kFloat) {
      // (T*B, I) = (T*B, 3H) @ (3H, I) with the packed tile: with I as small as
      // 28, MKL ran this at under half of the machine's rate.
      dx = at::zeros({Tn * B, I}, opts);
      ops.gemm_packed_parallel(Tn * B, I, 3 * H, dgx.data_ptr<float>(), 3 * H,
                               w_ih.contiguous().data_ptr<float>(), I, dx.data_ptr<float>(), I,
                               threads > 0 ? static_cast<int>(threads) : at::get_num_threads());
    }
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
  Tensor db_ih = has_b_ih ? db.narrow(0, 0, 3 * H) : Tensor();  // (3H,) Σ dG_x
  Tensor db_hh;                                                   // (3H,) Σ dG_h (never db_ih's memory)
  if (has_b_hh && reset_after) db_hh = at::cat({db.narrow(0, 0, 2 * H), db.narrow(0, 3 * H, H)});
  if (has_b_hh && !reset_after) db_hh = has_b_ih ? db_ih.clone() : db.narrow(0, 0, 3 * H);
  return {dx, need_h0 ? dh : Tensor(), dw_ih, dw_hh, db_ih, db_hh};
}

}  // namespace grulab
