// Eager training through the native GRU as a C++ autograd function: the
// forward saves what the backward needs, and the autograd engine runs the
// backward here without a Python call on the way. grulab.fused uses it for a
// native kernel in eager mode (torch.compile / torch.export see the operator
// torch.ops.grulab.gru_forward and its Python autograd formula instead).
//
// Why C++: in a training step at (B, T, I, H) = (32, 35, 28, 256) run after
// other work (a torch.nn.GRU step, the benchmark's interleaving), the Python of
// a torch.autograd.Function's forward and backward found its interpreter state
// evicted from the caches and cost ~0.35 ms more than the same two native calls
// made directly (benchmarks/results.md).
#include <torch/autograd.h>

#include <chrono>

#include "native.h"

namespace grulab {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LayerFn : public torch::autograd::Function<LayerFn> {
  // Inputs (the order of the gradients the backward returns): x, h0, w_ih, w_hh, b_ih, b_hh,
  // reset_after, isa, threads, timing. Forward and backward run on `threads` (0: torch's
  // count) and write their durations in seconds into timing[0] and timing[1] (float64),
  // for the thread governor (grulab.threads.later).
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                               bool reset_after, const std::string& isa, int64_t threads,
                               const Tensor& timing) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<Tensor> r = gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, true, isa, threads);
    const Tensor &out = r[0], &h_T = r[1], &saved = r[2];  // (T, B, H), (B, H), (T, B, 4H)
    ctx->save_for_backward({x, h0, w_ih, w_hh, out, saved});
    ctx->saved_data["reset_after"] = reset_after;
    ctx->saved_data["has_b_ih"] = b_ih.has_value() && b_ih->defined();
    ctx->saved_data["has_b_hh"] = b_hh.has_value() && b_hh->defined();
    ctx->saved_data["isa"] = isa;
    ctx->saved_data["threads"] = threads;
    ctx->saved_data["timing"] = timing;
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    timing.data_ptr<double>()[0] = took.count();
    return {out, h_T};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto start = std::chrono::steady_clock::now();
    variable_list result(10);  // one per forward input; undefined: no gradient
    const Tensor &grad_out = grads[0], &grad_hT = grads[1];
    if (!grad_out.defined() && !grad_hT.defined()) return result;
    const variable_list s = ctx->get_saved_variables();  // x, h0, w_ih, w_hh, out, saved
    const bool has_b_ih = ctx->saved_data["has_b_ih"].toBool();
    const bool has_b_hh = ctx->saved_data["has_b_hh"].toBool();
    // needs_input_grad counts tensor inputs only: an absent bias has no edge.
    const size_t e_b_ih = 4, e_b_hh = 4 + (has_b_ih ? 1 : 0);
    const bool need_x = ctx->needs_input_grad(0), need_h0 = ctx->needs_input_grad(1);
    std::vector<Tensor> g = gru_backward(
        grad_out.defined() ? std::optional<Tensor>(grad_out) : std::nullopt,
        grad_hT.defined() ? std::optional<Tensor>(grad_hT) : std::nullopt, s[0], s[1], s[2], s[3],
        s[4], s[5], ctx->saved_data["reset_after"].toBool(), has_b_ih && ctx->needs_input_grad(e_b_ih),
        has_b_hh && ctx->needs_input_grad(e_b_hh), need_x, need_h0,
        ctx->saved_data["isa"].toStringRef(), ctx->saved_data["threads"].toInt(), 0);
    // g: dx, dh0, dw_ih, dw_hh, db_ih, db_hh (undefined where not asked for)
    for (int i = 0; i < 6; ++i) result[i] = g[i];
    if (!ctx->needs_input_grad(2)) result[2] = Tensor();
    if (!ctx->needs_input_grad(3)) result[3] = Tensor();
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    ctx->saved_data["timing"].toTensor().data_ptr<double>()[1] = took.count();
    return result;
  }
};

std::vector<Tensor> gru_layer_train(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                    const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                    const std::optional<Tensor>& b_hh, bool reset_after,
                                    const std::string& isa, int64_t threads) {
  Tensor timing = at::zeros({2}, at::TensorOptions().dtype(at::kDouble));  // [forward s, backward s]
  variable_list r = LayerFn::apply(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, isa, threads, timing);
  return {r[0], r[1], timing};
}

}  // namespace grulab
