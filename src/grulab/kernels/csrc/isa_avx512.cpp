// The native GRU's loops compiled for AVX-512 (F, VL, BW, DQ): gcc vectorises the gate loops 16 floats wide, and the packed micro-kernels use 16-float registers.
// cpu.cpp picks this table only on a CPU that has these instructions.
#include <immintrin.h>

#include "kernels.h"  // before the pragma: its inline code stays baseline

#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")
#define GRULAB_ISA_NAME "avx512"
#define GRULAB_VEC_BYTES 64
#define GRULAB_PACKED 1

namespace grulab {
namespace avx512 {
#include "loops.inc"
}  // namespace avx512
}  // namespace grulab
