// Python bindings of the native GRU (module grulab._native). The torch
// operators (torch.ops.grulab.*) whose backend runs these, with their fake
// implementations and autograd formula, are registered in Python: src/grulab/fused.py.
#include <torch/extension.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &grulab::gru_forward, "GRU layer forward (native)");
  m.def("backward", &grulab::gru_backward, "GRU layer backward through time (native)");
  m.def("step", &grulab::gru_step, "single GRU step (native)");
  m.def(
      "plan",
      [](const std::string& isa, bool is_float, int64_t T, int64_t B, int64_t I, int64_t H,
         bool reset_after, int64_t threads) {
        // What forward and backward decide for this call (the same functions they run).
        const grulab::IsaOps& ops = grulab::ops_for(isa);
        const grulab::ForwardPlan f = grulab::forward_plan(ops, is_float, B, I, H, reset_after, threads);
        const grulab::BackwardPlan b =
            grulab::backward_plan(ops, is_float, T, B, I, H, reset_after, true, true, threads, 0);
        pybind11::dict fwd, bwd, out;
        fwd["threads"] = f.threads;
        fwd["packed"] = f.packed;
        fwd["split"] = f.by_rows ? "rows" : "units";
        fwd["bf16"] = f.bf16;
        bwd["threads"] = b.threads;
        bwd["packed"] = b.packed;
        bwd["split"] = b.by_rows ? "rows" : "units";
        bwd["chunk_steps"] = b.chunk;
        bwd["bias_sums_by_row_blocks"] = b.blocked_bias;
        bwd["dx_tile"] = b.dx_packed;
        bwd["dw_ih_narrow_tile"] = b.dw_ih_narrow;
        bwd["bf16"] = b.bf16;
        out["forward"] = fwd;
        out["backward"] = bwd;
        out["l2_bytes"] = grulab::l2_bytes();
        out["weights_fit_l2"] = grulab::fits_l2(3 * H * (H + I));
        out["register_rows"] = ops.rows;
        return out;
      },
      "what the native loops decide for a call (packed or not, split, chunking, threads)");
  m.def("release_scratch", &grulab::release_scratch, "free the calling thread's kept scratch buffers");
  m.def("cpu_supports", [](const std::string& isa) { return grulab::cpu_supports(isa.c_str()); },
        "whether this CPU can run the kernels of an instruction set (generic, avx2, avx512, avx512bf16, amx)");
  m.def("amx_unavailable", []() { return std::string(grulab::amx_unavailable()); },
        "why the AMX table cannot run here ('' if it can)");
  m.def("amx_self_check", [](const std::string& isa) {
    TORCH_CHECK(isa == "amx" || isa == "amx-emulated", "amx_self_check: 'amx' or 'amx-emulated', got '", isa, "'");
    grulab::ops_for(isa);  // raises where this CPU cannot run it
    return isa == "amx" ? grulab::amx::self_check() : grulab::amx_emulated::self_check();
  }, "the AMX tiles' self-check (a known product) on the amx or the emulated table");
}
