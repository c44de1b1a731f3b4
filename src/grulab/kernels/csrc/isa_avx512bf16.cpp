// The native GRU's loops compiled for AVX-512 with AVX512-BF16: the avx512 table's loops, plus
// the bf16 micro-kernels (vdpbf16ps, loops_bf16.inc) that autocast's bf16 runs. A CPU with AMX
// (Sapphire Rapids) gets the amx table (isa_amx.cpp) first, and this one where the OS does not
// grant the tiles; the batched GEMMs of the glue go to oneDNN, which uses AMX there.
// cpu.cpp picks this table only on a CPU that has these instructions.
#include <immintrin.h>

#include "kernels.h"  // before the pragma: its inline code stays baseline

#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")
#define GRULAB_ISA_NAME "avx512bf16"
#define GRULAB_VEC_BYTES 64
#define GRULAB_PACKED 1
#define GRULAB_BF16 1

namespace grulab {
namespace avx512bf16 {
#include "loops.inc"
}  // namespace avx512bf16
}  // namespace grulab
