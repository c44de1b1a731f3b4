// Python bindings of the native GRU (module grulab._native). The torch
// operators (torch.ops.grulab.*) whose backend runs these, with their fake
// implementations and autograd formula, are registered in Python: src/grulab/fused.py.
#include <torch/extension.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &grulab::gru_forward, "GRU layer forward (native)");
  m.def("backward", &grulab::gru_backward, "GRU layer backward through time (native)");
  m.def("step", &grulab::gru_step, "single GRU step (native)");
  m.def("release_scratch", &grulab::release_scratch, "free the calling thread's kept scratch buffers");
  m.def("cpu_supports", [](const std::string& isa) { return grulab::cpu_supports(isa.c_str()); },
        "whether this CPU can run the kernels of an instruction set (generic, avx2, avx512)");
}
