// Forward glue of the native GRU: checks, allocation, the batched input
// projection, then one instruction set's time loop (loops.inc).
#include "native.h"

namespace grulab {

const IsaOps& ops_for(const std::string& isa) {
  const IsaOps* ops = isa_ops(isa.c_str());
  TORCH_CHECK(ops != nullptr, "grulab native GRU: this CPU cannot run the '", isa,
              "' kernels (expected one of: generic", cpu_supports("avx2") ? ", avx2" : "",
              cpu_supports("avx512") ? ", avx512" : "", cpu_supports("avx512bf16") ? ", avx512bf16" : "",
              cpu_supports("amx") ? ", amx" : "", ")");
  return *ops;
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
  TORCH_CHECK(x.size(-2) > 0 && I > 0 && H > 0, "grulab native GRU: batch, input and hidden sizes must be "
              "positive, got x ", x.sizes(), " and h ", h.sizes(), " (grulab.fused runs zero sizes on fused-torch)");
  check(h, "h", {x.size(-2), H});
  check(w_ih, "w_ih", {3 * H, I});
  check(w_hh, "w_hh", {3 * H, H});
  if (b_ih) check(*b_ih, "b_ih", {3 * H});
  if (b_hh) check(*b_hh, "b_hh", {3 * H});
}

// x (T, B, I), h0 (B, H) -> [out (T, B, H), h_T (B, H), saved (T, B, 4H) or (1, B, 4H)]
std::vector<Tensor> gru_forward(const Tensor& x_, const Tensor& h0_, const Tensor& w_ih_,
                                const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                const std::optional<Tensor>& b_hh_, bool reset_after, bool save,
                                const std::string& isa, int64_t threads) {
  const IsaOps& ops = ops_for(isa);
  const BlasThreads blas_threads(threads);
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

  const ForwardPlan plan = forward_plan(ops, x.scalar_type() == at::kFloat, B, I, H, reset_after, threads);
  const int nt = plan.threads;
  if (plan.packed) {
    const int64_t P = (H + ops.panel - 1) / ops.panel;  // panels of one register of units
    const int64_t Ip = (I + 1) / 2 * 2;                  // bf16: x's rows padded to pairs
    Tensor pack_hh = scratch(kPackHH, {P * H * 3 * ops.panel}, at::kFloat);
    Tensor pack_ih = scratch(kPackIH, {P * Ip * 3 * ops.panel}, at::kFloat);
    Tensor bias = at::zeros({4 * H}, opts);  // [b_ir + b_hr | b_iz + b_hz | b_in | b_hn]
    if (b_ih.defined()) bias.narrow(0, 0, 3 * H).add_(b_ih);
    if (b_hh.defined()) {
      bias.narrow(0, 0, 2 * H).add_(b_hh.narrow(0, 0, 2 * H));
      bias.narrow(0, 3 * H, H).add_(b_hh.narrow(0, 2 * H, H));
    }
    // bf16 (loops_bf16.inc): x and h0 rounded to bf16 here, x's rows padded with a zero to
    // an even length; h_{t-1}'s bf16 rows then alternate between hbf[0] and hbf[1].
    Tensor xb, hbf, cbf;
    if (plan.bf16) {
      // Each buffer has kTileRowSlack zero rows after its last (AMX reads whole 16-row tiles).
      const auto bf16 = x.options().dtype(at::kBFloat16);
      xb = at::zeros({Tn * B + kTileRowSlack, Ip}, bf16);  // (T*B, Ip) x's rows
      xb.narrow(0, 0, Tn * B).narrow(1, 0, I).copy_(x.view({Tn * B, I}));
      hbf = at::zeros({2 * B + kTileRowSlack, H}, bf16);  // (2*B, H) h_{t-1}'s rows, two steps
      hbf.narrow(0, 0, B).copy_(h0);
      if (!reset_after) cbf = at::zeros({B + kTileRowSlack, H}, bf16);  // (B, H) r ⊙ h_{t-1}
    }
    auto bf = [](const Tensor& t) { return t.defined() ? reinterpret_cast<uint16_t*>(t.data_ptr()) : nullptr; };
    (plan.bf16 ? ops.forward_packed_bf : ops.forward_packed)(
        x.data_ptr<float>(), h0.data_ptr<float>(), all_zero(h0.data_ptr<float>(), h0.numel()),
        w_ih.data_ptr<float>(), w_hh.data_ptr<float>(), bias.data_ptr<float>(), Tn, B, I, H, save,
        reset_after, out.data_ptr<float>(), saved.data_ptr<float>(), pack_hh.data_ptr<float>(),
        pack_ih.data_ptr<float>(), plan.by_rows, nt, bf(xb), Ip, bf(hbf), bf(cbf));
    return {out, out[Tn - 1].clone(), saved};
  }

  // Input projections of all steps, gx = x W_ih^T + b_ih, by blocks of rows (gemm_by_rows: the same
  // bits whatever the thread count).
  Tensor gx = scratch(kGx, {Tn, B, 3 * H}, opts);  // (T, B, 3H)
  Tensor gx2 = gx.view({Tn * B, 3 * H});        // (T*B, 3H)
  if (b_ih.defined()) {
    gx2.copy_(b_ih.expand({Tn * B, 3 * H}));
  }
  gemm_by_rows(x.view({Tn * B, I}), w_ih.t(), gx2, b_ih.defined() ? 1.0 : 0.0, nt);
  const Tensor b_hh_or_0 = b_hh.defined() ? b_hh : at::zeros({3 * H}, opts);  // (3H,)
  if (x.scalar_type() == at::kFloat) {
    ops.forward_loop_f(gx.data_ptr<float>(), h0.data_ptr<float>(), w_hh.data_ptr<float>(),
                       b_hh_or_0.data_ptr<float>(), Tn, B, H, reset_after, save,
                       out.data_ptr<float>(), saved.data_ptr<float>(), nt);
  } else {
    ops.forward_loop_d(gx.data_ptr<double>(), h0.data_ptr<double>(), w_hh.data_ptr<double>(),
                       b_hh_or_0.data_ptr<double>(), Tn, B, H, reset_after, save,
                       out.data_ptr<double>(), saved.data_ptr<double>(), nt);
  }
  Tensor h_T = out[Tn - 1].clone();  // (B, H)
  return {out, h_T, saved};
}

// Single step for generation: x (B, I), h (B, H) -> h' (B, H), nothing saved.
Tensor gru_step(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
                bool reset_after, const std::string& isa) {
  const IsaOps& ops = ops_for(isa);
  TORCH_CHECK(x_.dim() == 2 && h_.dim() == 2, "grulab native gru_step: x must be (B, I), h (B, H)");
  check_native_args(x_, h_, w_ih_, w_hh_, b_ih_, b_hh_);
  const Tensor x = x_.contiguous(), h = h_.contiguous();
  const Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  const Tensor zeros = (b_ih_ && b_hh_) ? Tensor() : at::zeros({3 * H}, x.options());
  const Tensor b_ih = b_ih_ ? b_ih_->contiguous() : zeros;  // (3H,)
  const Tensor b_hh = b_hh_ ? b_hh_->contiguous() : zeros;  // (3H,)
  Tensor h_new = at::empty({B, H}, x.options());            // (B, H)
  const int nt = loop_threads(B, H);
  if (x.scalar_type() == at::kFloat) {
    ops.step_f(x.data_ptr<float>(), h.data_ptr<float>(), w_ih.data_ptr<float>(),
               w_hh.data_ptr<float>(), b_ih.data_ptr<float>(), b_hh.data_ptr<float>(), B, I, H,
               reset_after, h_new.data_ptr<float>(), nt);
  } else {
    ops.step_d(x.data_ptr<double>(), h.data_ptr<double>(), w_ih.data_ptr<double>(),
               w_hh.data_ptr<double>(), b_ih.data_ptr<double>(), b_hh.data_ptr<double>(), B, I,
               H, reset_after, h_new.data_ptr<double>(), nt);
  }
  return h_new;
}


}  // namespace grulab
