// The native GRU's loops compiled for AMX: the avx512bf16 table's loops, with the bf16 per-step
// products on AMX tiles (loops_amx.inc: tdpbf16ps, 16 rows at a time) instead of vdpbf16ps.
// cpu.cpp offers this table only on a CPU with AMX-TILE and AMX-BF16 whose OS granted the tile
// state (arch_prctl) and whose tiles passed amx_self_check.
#include <immintrin.h>

#include "kernels.h"  // before the pragma: its inline code stays baseline

#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16")
#define GRULAB_ISA_NAME "amx"
#define GRULAB_VEC_BYTES 64
#define GRULAB_PACKED 1
#define GRULAB_BF16 1
#define GRULAB_AMX 1

namespace grulab {
namespace amx {
#include "loops.inc"
bool self_check() { return amx_self_check(); }
}  // namespace amx
}  // namespace grulab
