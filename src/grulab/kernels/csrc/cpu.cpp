// Which instruction sets this CPU can run, and the kernel table for each.
// __builtin_cpu_supports reads cpuid and (for AVX and AVX-512) checks that the
// OS saves the wider registers (XGETBV), so a "yes" here is safe to execute.
#include <cstring>

#include "kernels.h"

namespace grulab {

bool cpu_supports(const char* name) {
  __builtin_cpu_init();
  if (std::strcmp(name, "generic") == 0) return true;
  if (std::strcmp(name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(name, "avx512") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(name, "avx512bf16") == 0)
    return cpu_supports("avx512") && __builtin_cpu_supports("avx512bf16");
  return false;
}

const IsaOps* isa_ops(const char* name) {
  if (!cpu_supports(name)) return nullptr;
  if (std::strcmp(name, "avx512bf16") == 0) return &avx512bf16::ops;
  if (std::strcmp(name, "avx512") == 0) return &avx512::ops;
  if (std::strcmp(name, "avx2") == 0) return &avx2::ops;
  return &generic::ops;
}

}  // namespace grulab
