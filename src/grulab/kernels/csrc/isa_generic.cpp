// The native GRU's loops compiled for the baseline x86-64 (SSE2): runs on every x86-64 CPU; gcc vectorises the gate loops 4 floats wide; no packed kernels.
// cpu.cpp picks this table only on a CPU that has these instructions.
#include <immintrin.h>

#include "kernels.h"  // before the pragma: its inline code stays baseline


#define GRULAB_ISA_NAME "generic"
#define GRULAB_VEC_BYTES 16
#define GRULAB_PACKED 0

namespace grulab {
namespace generic {
#include "loops.inc"
}  // namespace generic
}  // namespace grulab
