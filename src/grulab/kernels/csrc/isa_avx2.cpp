// The native GRU's loops compiled for AVX2 + FMA (Intel Haswell+, AMD Zen+): 8-float vectors and the packed-weight micro-kernels.
// cpu.cpp picks this table only on a CPU that has these instructions.
#include <immintrin.h>

#include "kernels.h"  // before the pragma: its inline code stays baseline

#pragma GCC target("avx2,fma")
#define GRULAB_ISA_NAME "avx2"
#define GRULAB_VEC_BYTES 32
#define GRULAB_PACKED 1

namespace grulab {
namespace avx2 {
#include "loops.inc"
}  // namespace avx2
}  // namespace grulab
