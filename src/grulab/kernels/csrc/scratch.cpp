#include "native.h"

namespace grulab {

// ---------------------------------------------------------------------------
// Scratch buffers kept from call to call. A fresh buffer of a few MB is mapped
// anew by malloc and costs one page fault per 4 KiB on first touch (about
// 2 µs each on the VMs this was measured on: 2-3 ms of a 10 ms backward at
// (B, T, H) = (32, 35, 256)); a buffer kept from the previous call costs none.
// Only pure scratch goes here, never a tensor that is returned or saved for
// the backward. One set per calling thread; buffers over kScratchCap bytes are
// not kept. release_scratch() frees the calling thread's set.
// ---------------------------------------------------------------------------
constexpr int64_t kScratchCap = int64_t(256) << 20;

static std::vector<Tensor>& scratch_set() {
  thread_local std::vector<Tensor>* set = new std::vector<Tensor>(kNumSlots);  // never destroyed
  return *set;
}

Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t n = 1;
  for (int64_t d : sizes) n *= d;
  if (n * static_cast<int64_t>(opts.dtype().itemsize()) > kScratchCap) return at::empty(sizes, opts);
  Tensor& buf = scratch_set()[slot];
  if (!buf.defined() || buf.numel() < n || buf.dtype() != opts.dtype()) {
    buf = Tensor();  // free the old one first
    buf = at::empty({n}, opts);
  }
  return buf.narrow(0, 0, n).view(sizes);
}

void release_scratch() {
  for (Tensor& t : scratch_set()) t = Tensor();
}

}  // namespace grulab
