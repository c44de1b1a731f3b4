// Which instruction sets this CPU can run, and the kernel table for each.
// __builtin_cpu_supports reads cpuid and (for AVX and AVX-512) checks that the
// OS saves the wider registers (XGETBV), so a "yes" here is safe to execute.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

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
  if (std::strcmp(name, "amx") == 0) return amx_unavailable()[0] == '\0';  // AVX512-BF16 included
  if (std::strcmp(name, "amx-emulated") == 0) return cpu_supports("avx512bf16");
  return false;
}

// AMX: CPUID leaf 7 says whether the CPU has the tiles and their bf16 product; Linux (5.16 on)
// then wants each process to ask for the tiles' state (8 KiB per thread) before the first tile
// instruction, or that instruction faults: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA),
// once per process. Last, the tiles compute a known product (amx::self_check). Any failure is
// the reason, and the amx table is not offered (the avx512bf16 table runs the bf16 calls).
const char* amx_unavailable() {
  static const std::string why = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!cpu_supports("avx512bf16")) return std::string("this CPU has no AMX-BF16 tiles (nor AVX512-BF16)");
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 22)))
      return std::string("this CPU has no AMX-BF16 tiles");
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      return std::string("the OS did not grant the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
             std::strerror(errno) + "; Linux 5.16 or later grants it)";
    if (!amx::self_check()) return std::string("the AMX tiles failed their self-check (a known product came out wrong)");
    return std::string();
  }();
  return why.c_str();
}

const IsaOps* isa_ops(const char* name) {
  if (!cpu_supports(name)) return nullptr;
  if (std::strcmp(name, "amx") == 0) return &amx::ops;
  if (std::strcmp(name, "amx-emulated") == 0) return &amx_emulated::ops;
  if (std::strcmp(name, "avx512bf16") == 0) return &avx512bf16::ops;
  if (std::strcmp(name, "avx512") == 0) return &avx512::ops;
  if (std::strcmp(name, "avx2") == 0) return &avx2::ops;
  return &generic::ops;
}

}  // namespace grulab
