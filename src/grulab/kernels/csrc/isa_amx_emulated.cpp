// The amx table's loops on AMX tiles emulated in software (loops_amx.inc, GRULAB_AMX_EMULATE):
// slow, and only for tests, which run the AMX code paths (row blocks, strides, tails) on any
// CPU with AVX512-BF16 against the vdpbf16ps table and float64. Never offered to users.
#include <immintrin.h>

#include "kernels.h"  // before the pragma: its inline code stays baseline

#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")
#define GRULAB_ISA_NAME "amx-emulated"
#define GRULAB_VEC_BYTES 64
#define GRULAB_PACKED 1
#define GRULAB_BF16 1
#define GRULAB_AMX 1
#define GRULAB_AMX_EMULATE 1

namespace grulab {
namespace amx_emulated {
#include "loops.inc"
bool self_check() { return amx_self_check(); }
}  // namespace amx_emulated
}  // namespace grulab
