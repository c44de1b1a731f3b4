r"""A fused GRU layer: bulk input projections and hand-written backprop through time.

``grulab.reference`` computes one equation per line and lets autograd record
every small operation of every time step. This module computes the same cell
(see the reference for the notation and both ``reset_after`` variants), but
organises the work the way cuDNN does:

* **Forward.** The input projections of all T steps do not depend on the
  recurrence, so they are ONE GEMM: ``G_x = X W_ih^T + b_ih`` with X reshaped
  to (T·B, I), giving (T, B, 3H). Per step there is one GEMM,
  ``G_h = h_{t-1} W_hh^T + b_hh`` (B, 3H), and one fused pass of gate
  arithmetic. Per step we save only what the backward needs: r, z, n and one
  more (B, H) block c (below).
* **Backward.** Autograd is bypassed (a ``torch.autograd.Function``): per step
  only the gate gradients and the one GEMM that carries dL/dh backwards; the
  weight gradients of all steps are summed by one big GEMM each at the end
  (the native tier: one per chunk of steps, so its buffers stay small).

Gradients (a_r, a_z, a_n are the pre-activations of the three gates; d is
dL/dh_t, the gradient arriving from the output at t plus from step t+1)::

    h_t   = z ⊙ h_{t-1} + (1 − z) ⊙ n
    dn    = d ⊙ (1 − z)            da_n = dn ⊙ (1 − n²)           (tanh' = 1 − tanh²)
    dz    = d ⊙ (h_{t-1} − n)       da_z = dz ⊙ z ⊙ (1 − z)        (σ' = σ(1 − σ))

reset_after=True (PyTorch, cuDNN): ``a_n = G_x,n + r ⊙ c`` with
``c = h_{t-1} W_hn^T + b_hn`` (saved)::

    da_r  = da_n ⊙ c ⊙ r ⊙ (1 − r)
    dG_x  = [da_r, da_z, da_n]                   gradient of the x-side  (B, 3H)
    dG_h  = [da_r, da_z, da_n ⊙ r]               gradient of the h-side  (B, 3H)
    dL/dh_{t-1} = d ⊙ z + dG_h W_hh                                       (one GEMM)

reset_after=False (the notes, Cho 2014): ``a_n = G_x,n + (r ⊙ h_{t-1}) W_hn^T + b_hn``
with ``c = r ⊙ h_{t-1}`` (saved)::

    dc    = da_n W_hn                            (B, H)                    (GEMM 1)
    da_r  = dc ⊙ h_{t-1} ⊙ r ⊙ (1 − r)
    dG_x  = dG_h = [da_r, da_z, da_n]
    dL/dh_{t-1} = d ⊙ z + dc ⊙ r + [da_r, da_z] W_h[rz]                   (GEMM 2)

After the loop, with dG stacked over time as (T·B, 3H)::

    dX    = dG_x W_ih                  dW_ih = dG_x^T X          db_ih = Σ dG_x
    dW_hh = dG_h^T H_prev              db_hh = Σ dG_h
    (reset_after=False: the n rows of dW_hh are da_n^T (r ⊙ H_prev))
    dh_0  = dL/dh_0 from the last loop step

Two tiers implement this, with the same autograd wrapper:

* ``"torch"``: torch operations only; runs on any device. At these sizes a
  small op costs more in dispatch than in arithmetic, so it rewrites the
  backward around factors known before the loop: with A = (1 − z)(1 − n²),
  da_n = d·A, da_z = d·(h_{t-1} − n)·z(1 − z), da_r = d·A·c·r(1 − r) and
  da_n·r = d·A·r are all d times a per-step factor, computed in bulk over all
  T steps first. A backward step is then one broadcast multiply, one add and
  the GEMM (3 ops instead of ~19); a forward step is the GEMM and 4 ops.
* ``"native"``: ``csrc/``, the whole time loop in C++ with the gate
  arithmetic fused in vectorised loops (float32/float64 CPU tensors only),
  built when grulab is installed (:mod:`grulab.kernels.native`) and compiled once per
  instruction set, so :mod:`grulab.kernels` can pick ``native-avx512``,
  ``native-avx2`` or ``native-generic`` for the CPU at hand. Its threads split
  the *hidden units*: thread k owns units [j0, j1), computes their three gate
  columns of h W_hh^T with a single-threaded GEMM on its own rows of W_hh
  (which stay in its core's cache) and then their gates, and meets the other
  threads at one barrier per step (how many threads: measured per call shape by
  :mod:`grulab.kernels.threads`, so a core taken by another process does not stall every
  step). The backward splits dL/dh the same way, and sums the bias gradients
  of its units as it makes their gate gradients.
  For float32 with ``reset_after=True`` the AVX2 and AVX-512 builds replace
  the per-step GEMMs by the file's own micro-kernel on weights packed once per
  call, with the gate arithmetic applied to the register tile; a thread that
  has finished its own panels takes the remaining ones of a slower thread.
  With enough batch rows (a full register tile per thread) and packed weights
  that fit in one core's L2, these loops split the *batch rows* instead: rows
  are independent, so each thread runs its rows through all T steps with no
  barrier at all (``split_rows`` in ``csrc/native.h``).

Mixed precision. Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` grulab.kernels picks the
native tier's bf16 tables (``native-amx``, where the CPU has AMX-BF16 tiles, else
``native-avx512bf16``, where it has AVX512-BF16): the same loops, but the per-step products take
bf16 operands with float32 sums (``csrc/loops_bf16.inc``, on AMX ``csrc/loops_amx.inc``), and
dW_hh, dW_ih and dX are bf16 GEMMs per chunk; h, the gates, what is saved and what is returned
stay float32. Every other kernel runs an autocast call in float32 (the backends below run with
autocast off). bfloat16 parameters run the bf16 table on float32 copies (_NativeTier).

Both tiers run behind one torch operator (``torch.ops.grulab.gru_forward``,
``gru_backward``, ``gru_step``) with fake implementations and one autograd
formula (``_Layer``), so ``torch.compile(fullgraph=True)`` and ``torch.export``
see one node per layer, and every call, eager or traced, goes through the same
argument handling, layouts and zero sizes included. A backward whose own graph is
needed (``create_graph=True``: double backward) or that is batched (vmap,
``is_grads_batched``), and calls under torch.func transforms, take
:mod:`grulab.reference`'s equations under autograd (the operator section below).
:mod:`grulab.kernels` decides which kernel runs (``grulab kernels`` shows it);
``GRULAB_KERNEL=<name>`` forces one.
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from grulab import kernels, reference
from grulab.kernels import native, threads

__all__ = ["gru_layer", "gru_step", "backend", "native_available", "release_scratch", "forget_choices"]


# ---------------------------------------------------------------------------
# Tier 1: pure PyTorch
# ---------------------------------------------------------------------------


# Scratch buffers kept from call to call (CPU only; CUDA has its caching
# allocator). A fresh buffer of a few MB is mapped anew by malloc and costs a
# page fault per 4 KiB on first touch: about 2 ms of a ~10 ms backward at
# (B, T, H) = (32, 35, 256) on the machines this was measured on. Only pure
# scratch goes here, never a tensor that is returned or saved for backward.
# One set per thread; buffers over _SCRATCH_CAP bytes are not kept.
_SCRATCH_CAP = 256 << 20
_scratch = threading.local()


def _scratch_buffer(slot: str, shape: tuple, like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` (dtype/device of ``like``), reused across calls."""
    n = math.prod(shape)
    if like.device.type != "cpu" or n * like.element_size() > _SCRATCH_CAP:
        return like.new_empty(shape)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype:
        bufs.pop(slot, None)  # free the old one first
        buf = bufs[slot] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(shape)


def release_scratch() -> None:
    """Free the scratch buffers that the fused GRU keeps for the calling thread (both tiers)."""
    _scratch.__dict__.pop("bufs", None)
    if native._module is not None:
        native._module.release_scratch()


def _bias_sum(b_ih, b_hh, lo: int, hi: int):
    """b_ih[lo:hi] + b_hh[lo:hi], either may be None."""
    parts = [b[lo:hi] for b in (b_ih, b_hh) if b is not None]
    return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _proj(x2, w, b, out):
    """x2 W^T + b for all steps at once, written into ``out`` (a view) or a new tensor."""
    if b is None:
        return torch.mm(x2, w.t(), out=out) if out is not None else x2 @ w.t()
    return torch.addmm(b, x2, w.t(), out=out) if out is not None else torch.addmm(b, x2, w.t())


class _TorchTier:
    """The algorithm in torch operations (any device, any floating dtype).

    At these sizes a small op costs more in dispatch than in arithmetic, so the
    loops hold as few ops as possible: the bias sums, the input projections and
    every factor of the gate gradients that does not depend on dL/dh are
    computed in bulk over all T steps, outside the loops, in place in
    preallocated buffers rather than through temporaries.
    What stays in the loops is the one GEMM per step and the few ops that must
    be sequential: 5 per forward step, 3 per backward step (reset_after=True).
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, save: bool):
        T, B, I = x.shape
        H = h0.shape[1]
        x2 = x.reshape(T * B, I)  # (T*B, I)
        out = x.new_empty(T, B, H)  # (T, B, H)
        outs = out.unbind(0)  # T views (B, H)
        # g holds the pre-activations as they build up: the input projections of
        # all steps (one GEMM per gate block) plus the h-side biases that fold in.
        g = x.new_empty(T, B, 3 * H)  # (T, B, 3H)
        g2 = g.view(T * B, 3 * H)  # (T*B, 3H)
        g_t = g.unbind(0)  # T views (B, 3H)
        g_rz = g[:, :, : 2 * H].unbind(0)  # T views (B, 2H)
        g_r, g_z, g_n = (g[:, :, k * H : (k + 1) * H].unbind(0) for k in range(3))  # T views (B, H) each
        h = h0  # (B, H)
        if reset_after:
            # a_n = gx_n + r ⊙ c with c = h W_hn^T + b_hn: gx_n goes to gn (which becomes n),
            # g's n block starts at b_hn, its r, z blocks at gx + b_ih + b_hh.
            b_rz = _bias_sum(b_ih, b_hh, 0, 2 * H)  # (2H,) or None
            _proj(x2, w_ih[: 2 * H], b_rz, g2[:, : 2 * H])  # (T*B, 2H)
            gn = _proj(x2, w_ih[2 * H :], None if b_ih is None else b_ih[2 * H :], None).view(T, B, H)  # (T, B, H)
            gns = gn.unbind(0)  # T views (B, H)
            g2[:, 2 * H :] = 0 if b_hh is None else b_hh[2 * H :]  # (T*B, H)
            w_t = w_hh.t()  # (H, 3H)
            for t in range(T):
                g_t[t].addmm_(h, w_t)  # (B, 3H) += h W_hh^T  ->  [a_r, a_z, c]
                g_rz[t].sigmoid_()  # (B, 2H) [r, z]
                gns[t].addcmul_(g_r[t], g_n[t]).tanh_()  # (B, H) n = tanh(gx_n + r ⊙ c)
                h = torch.lerp(gns[t], h, g_z[t], out=outs[t])  # (B, H) z h + (1 − z) n
            saved = (g, gn)  # [r, z, c] (T, B, 3H) and n (T, B, H)
        else:
            # a_n = gx_n + (r ⊙ h) W_hn^T + b_hn: all of b_hh folds into g.
            _proj(x2, w_ih, _bias_sum(b_ih, b_hh, 0, 3 * H), g2)  # (T*B, 3H)
            w_rz_t, w_n_t = w_hh[: 2 * H].t(), w_hh[2 * H :].t()  # (H, 2H), (H, H)
            rh = x.new_empty(T, B, H)  # (T, B, H) r ⊙ h_{t-1}
            rhs = rh.unbind(0)  # T views (B, H)
            for t in range(T):
                g_rz[t].addmm_(h, w_rz_t).sigmoid_()  # (B, 2H) [r, z]
                torch.mul(g_r[t], h, out=rhs[t])  # (B, H) r ⊙ h
                g_n[t].addmm_(rhs[t], w_n_t).tanh_()  # (B, H) n
                h = torch.lerp(g_n[t], h, g_z[t], out=outs[t])  # (B, H)
            saved = (g, rh)  # [r, z, n] (T, B, 3H) and r ⊙ h_{t-1} (T, B, H)
        return out, out[T - 1].clone(), (saved if save else None)

    @staticmethod
    def _update_factors(z, n, out, h0, b_z, a, scratch):
        """The factors of da_z and da_n shared by both variants, written in place (all (T, B, H)):
        b_z = (h_{t-1} − n) z (1 − z) and a = A = (1 − z)(1 − n²); ``scratch`` is overwritten."""
        torch.addcmul(z, z, z, value=-1, out=b_z)  # z (1 − z)
        torch.sub(out[:-1], n[1:], out=scratch[1:])  # h_{t-1} − n
        torch.sub(h0, n[0], out=scratch[0])
        b_z.mul_(scratch)  # B_z
        torch.mul(n, n, out=a).sub_(1)  # n² − 1
        torch.sub(z, 1, out=scratch)  # z − 1
        a.mul_(scratch)  # A = (1 − z)(1 − n²)

    @staticmethod
    def _prev_mm(dg, out, h0):
        """dg^T H_prev for dg (T, B, K): Σ_t dg_t^T h_{t-1}, without stacking h_{t-1}.  (K, H)"""
        T, B, K = dg.shape
        H = h0.shape[1]
        res = dg[0].t() @ h0  # (K, H) the t = 0 term
        if T > 1:
            res.addmm_(dg[1:].reshape((T - 1) * B, K).t(), out[:-1].reshape((T - 1) * B, H))  # (K, H)
        return res

    @staticmethod
    def backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after: bool,
                 has_b_ih: bool, has_b_hh: bool, need_x: bool, need_h0: bool):
        T, B, I = x.shape
        H = h0.shape[1]
        g, extra = saved
        # d = dL/dh_t, carried backwards; it starts as dL/dh_{T-1}.
        if grad_out is not None:
            d = grad_out[T - 1] + grad_hT if grad_hT is not None else grad_out[T - 1].clone()  # (B, H)
        else:
            d = grad_hT.clone()  # (B, H)
        gos = grad_out.unbind(0) if grad_out is not None else None  # T views (B, H)
        r, z, c_or_n = g.view(T, B, 3, H).unbind(2)  # each (T, B, H)
        if reset_after:
            c, n = c_or_n, extra  # (T, B, H) each
            # Every gate gradient is d times a factor known before the loop (module docstring):
            #   da_r = d·A·c·r(1−r), da_z = d·(h−n)·z(1−z), da_n·r = d·A·r, da_n = d·A, and d·z,
            # with A = (1−z)(1−n²). s holds these factors [C_r, B_z, D_n, A, z]; the loop turns
            # them into gradients in place, so s[:, :, 0:3] ends up as dG_h and [0, 1, 3] as dG_x.
            s = _scratch_buffer("s", (T, B, 5, H), x)  # (T, B, 5, H)
            s_r, s_z, s_dn, s_a, s_zz = s.unbind(2)  # each (T, B, H), views
            s_zz.copy_(z)  # z
            _TorchTier._update_factors(z, n, out, h0, s_z, s_a, s_dn)  # B_z, A (s_dn as scratch)
            torch.mul(s_a, r, out=s_dn)  # D_n = A r
            torch.addcmul(r, r, r, value=-1, out=s_r).mul_(c).mul_(s_a)  # C_r = A c r (1 − r)
            s_t = s.unbind(0)  # T views (B, 5, H)
            s_dgh = s[:, :, 0:3].unbind(0)  # T views (B, 3, H)
            s_dz = s_zz.unbind(0)  # T views (B, H)
            for t in range(T - 1, -1, -1):
                s_t[t].mul_(d.unsqueeze(1))  # (B, 5, H) [da_r, da_z, da_n r, da_n, d z]
                if t > 0 and gos is not None:
                    s_dz[t].add_(gos[t - 1])  # (B, H) d z + dL/dout_{t-1}
                if t > 0 or need_h0:
                    d = torch.addmm(s_dz[t], s_dgh[t].reshape(B, 3 * H), w_hh)  # (B, H) + (B, 3H) @ (3H, H)
            dgh = s[:, :, 0:3].reshape(T, B, 3 * H)  # (T, B, 3H) view, row stride 5H
            dgx_rz = s[:, :, 0:2].reshape(T * B, 2 * H)  # (T*B, 2H) view
            dgx_n = s_a.reshape(T * B, H)  # (T*B, H) view
            dw_hh = _TorchTier._prev_mm(dgh, out, h0)  # (3H, H)
            db_hh = dgh.sum((0, 1)) if has_b_hh else None  # (3H,)
        else:
            n, rh = c_or_n, extra  # (T, B, H) each; rh = r ⊙ h_{t-1}
            w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H :]  # (2H, H), (H, H)
            # Factors known before the loop: [B_z, A] for (da_z, da_n) and e = h·r(1−r) for da_r.
            k = _scratch_buffer("k", (T, B, 2, H), x)  # (T, B, 2, H)
            k_z, k_a = k.unbind(2)  # (T, B, H) each
            e = torch.addcmul(r, r, r, value=-1)  # (T, B, H) r (1 − r)
            torch.mul(e[1:], out[:-1], out=e[1:])  # h_{t-1} r (1 − r)
            e[0].mul_(h0)
            _TorchTier._update_factors(z, n, out, h0, k_z, k_a, torch.empty_like(z))  # B_z, A
            dg = _scratch_buffer("s", (T, B, 3, H), x)  # (T, B, 3, H) [da_r, da_z, da_n]
            for t in range(T - 1, -1, -1):
                dgt = dg[t]  # (B, 3, H)
                torch.mul(k[t], d.unsqueeze(1), out=dgt[:, 1:3])  # (B, 2, H) [da_z, da_n]
                dc = dgt[:, 2] @ w_n  # (B, H) dL/d(r ⊙ h)
                torch.mul(dc, e[t], out=dgt[:, 0])  # (B, H) da_r
                acc = torch.addcmul(d * z[t], dc, r[t])  # (B, H) d z + dc r
                if t > 0 and gos is not None:
                    acc += gos[t - 1]  # (B, H)
                d = acc.addmm_(dgt[:, 0:2].reshape(B, 2 * H), w_rz)  # (B, H) + (B, 2H) @ (2H, H)
            dgx = dg.view(T * B, 3 * H)  # (T*B, 3H)
            dgx_rz, dgx_n = dgx[:, : 2 * H], dgx[:, 2 * H :]  # (T*B, 2H), (T*B, H)
            dw_hh = torch.cat([_TorchTier._prev_mm(dg[:, :, 0:2].reshape(T, B, 2 * H), out, h0),  # (2H, H)
                               dgx_n.t() @ rh.view(T * B, H)])  # (H, H)
            db_hh = dgx.sum(0) if has_b_hh else None  # (3H,)

        # The x side, batched over time: one GEMM or reduction per gate block.
        x2 = x.reshape(T * B, I)  # (T*B, I)
        dw_ih = torch.cat([dgx_rz.t() @ x2, dgx_n.t() @ x2])  # (3H, I)
        db_ih = torch.cat([dgx_rz.sum(0), dgx_n.sum(0)]) if has_b_ih else None  # (3H,)
        dx = None
        if need_x:
            dx = torch.addmm(dgx_n @ w_ih[2 * H :], dgx_rz, w_ih[: 2 * H]).view(T, B, I)  # (T, B, I)
        return dx, (d if need_h0 else None), dw_ih, dw_hh, db_ih, db_hh

    @staticmethod
    def step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after: bool):
        H = h.shape[1]
        gi = torch.addmm(b_ih, x, w_ih.t()) if b_ih is not None else x @ w_ih.t()  # (B, 3H)
        if reset_after:
            gh = torch.addmm(b_hh, h, w_hh.t()) if b_hh is not None else h @ w_hh.t()  # (B, 3H)
            rz = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])  # (B, 2H)
            n = torch.tanh(torch.addcmul(gi[:, 2 * H :], rz[:, :H], gh[:, 2 * H :]))  # (B, H)
        else:
            w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H :]  # (2H, H), (H, H)
            gh = torch.addmm(b_hh[: 2 * H], h, w_rz.t()) if b_hh is not None else h @ w_rz.t()  # (B, 2H)
            rz = torch.sigmoid(gi[:, : 2 * H] + gh)  # (B, 2H)
            rh = rz[:, :H] * h  # (B, H)
            ghn = torch.addmm(b_hh[2 * H :], rh, w_n.t()) if b_hh is not None else rh @ w_n.t()  # (B, H)
            n = torch.tanh(gi[:, 2 * H :] + ghn)  # (B, H)
        return torch.lerp(n, h, rz[:, H:])  # (B, H) z h + (1 − z) n


# ---------------------------------------------------------------------------
# Tier 2: native (C++, csrc/), one build for every x86-64 CPU (grulab.kernels.native)
# ---------------------------------------------------------------------------


class _NativeTier:
    """Thin adapter to the C++ extension; ``isa`` picks the instruction set's loops.

    The time loops' thread count is chosen per call shape by :mod:`grulab.kernels.threads`
    (measured, so a core taken by another process does not stall every step)."""

    @staticmethod
    def key(kind: str, isa: str, shape: tuple, H: int, dtype: torch.dtype, reset_after: bool, flag: bool) -> tuple:
        """The thread governor's key for a call: kind ("forward" or "backward"), the ISA, x's
        (T, B, I), H, dtype, cell form, and save (forward) or need_x (backward)."""
        return (kind, isa, shape, H, dtype, reset_after, flag)

    @staticmethod
    def threads_in_use(isa: str, shape: tuple, H: int, dtype: torch.dtype, reset_after: bool) -> Optional[int]:
        """The count the governor uses now for calls of this shape (None: not timed yet)."""
        counts = threads.snapshot()
        for kind, flag in (("forward", True), ("backward", True), ("forward", False), ("backward", False)):
            n = counts.get(_NativeTier.key(kind, isa, shape, H, dtype, reset_after, flag))
            if n is not None:
                return n
        return None

    # bfloat16 tensors (bf16 parameters, the bf16 kernel only): the C++ side takes float32 (the
    # master copy of the arithmetic: its products are bf16 anyway), and what goes back to the
    # caller is bfloat16 again; the saved gates stay float32.
    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, save: bool, isa: str):
        if x.dtype == torch.bfloat16:
            out, h_T, saved = _NativeTier.forward(*_as_float(x, h0, w_ih, w_hh, b_ih, b_hh), reset_after, save, isa)
            return out.to(x.dtype), h_T.to(x.dtype), saved
        key = _NativeTier.key("forward", isa, tuple(x.shape), h0.shape[1], x.dtype, reset_after, save)
        out, h_T, saved = threads.timed(key, lambda n: native.load().forward(
            x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, isa, n))
        return out, h_T, ((saved,) if save else None)

    @staticmethod
    def backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after: bool,
                 has_b_ih: bool, has_b_hh: bool, need_x: bool, need_h0: bool, isa: str):
        if x.dtype == torch.bfloat16:
            grads = _NativeTier.backward(*_as_float(grad_out, grad_hT, x, h0, w_ih, w_hh, out), saved, reset_after,
                                         has_b_ih, has_b_hh, need_x, need_h0, isa)
            return tuple(None if g is None else g.to(x.dtype) for g in grads)
        key = _NativeTier.key("backward", isa, tuple(x.shape), h0.shape[1], x.dtype, reset_after, need_x)
        return tuple(threads.timed(key, lambda n: native.load().backward(
            grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved[0], reset_after, has_b_ih, has_b_hh,
            need_x, need_h0, isa, n, 0)))  # 0: the C++ side sizes the chunks of steps

    @staticmethod
    def step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after: bool, isa: str):
        if x.dtype == torch.bfloat16:
            return native.load().step(*_as_float(x, h, w_ih, w_hh, b_ih, b_hh), reset_after, isa).to(x.dtype)
        return native.load().step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, isa)


def _as_float(*tensors):
    """float32 copies of bfloat16 tensors (None stays None)."""
    return tuple(None if t is None else t.float() for t in tensors)


def _tier(kernel: str):
    """(tier, extra args) for a fused kernel name from grulab.kernels.

    The name comes from the operator's ``kernel`` argument, which a graph made by torch.export
    (or torch.compile's caches) carries to whatever CPU runs it. A native kernel this CPU cannot
    run (a program exported on a Sapphire Rapids names native-amx; on an AMD Zen 3 even
    native-avx512 is out) is replaced, with one warning, by the first native kernel here that
    computes the same: a bf16 one for a bf16 name where this CPU has bf16 units, else float32,
    as autocast falls back; fused-torch where no native kernel runs."""
    if kernel == "fused-torch":
        return _TorchTier, ()
    named = kernels.BY_NAME.get(kernel)
    if named is None or not kernel.startswith("native-"):
        raise ValueError(f"{kernel!r} is not a fused GRU kernel")
    query = kernels.Query(autocast=named.bf16)  # a float32 call it takes
    why = named.why_not(query)  # this CPU's (and native-amx's tiles' check)
    if why is None:
        return _NativeTier, (kernel[len("native-"):],)
    here, _ = kernels.first_native(query)
    warnings.warn(f"grulab: this call names the GRU kernel {kernel}, which cannot run here ({why}); "
                  f"running {here or 'fused-torch'} instead (the same function; a graph exported "
                  f"on another CPU names that CPU's kernel)", RuntimeWarning, stacklevel=2)
    return _tier(here) if here is not None else (_TorchTier, ())


def native_available() -> bool:
    """True if the C++ tier is usable (loads it, or builds it on first use)."""
    return native.load() is not None


def backend() -> str:
    """The tier used for CPU float32 tensors: ``"native"`` or ``"torch"``."""
    return "native" if kernels.select("fused").name.startswith("native") else "torch"


def _kernel_for(backend: Optional[str], x: Tensor, reset_after: bool) -> str:
    """The fused kernel for this call: ``backend`` if given ("native" = the best native one,
    "torch" = fused-torch, or a kernel name), else grulab.kernels' choice."""
    mixed = kernels.bf16_autocast(x.device.type)
    if backend is None:
        return kernels.select_name("fused", x.device.type, x.dtype, reset_after, mixed)
    if backend == "torch":
        return "fused-torch"
    if backend == "native":
        name, why = kernels.first_native(kernels.Query(x.device.type, x.dtype, reset_after, mixed))
        if name is None:
            raise RuntimeError(f"the native GRU kernels are unavailable here: {why}")
        return name
    k = kernels.BY_NAME.get(backend)
    if k is None or k.impl != "fused":
        raise ValueError(f"unknown GRU backend {backend!r} (use 'native', 'torch' or a "
                         f"fused kernel name: {', '.join(n for n, k in kernels.BY_NAME.items() if k.impl == 'fused')})")
    why = k.why_not(kernels.Query(x.device.type, x.dtype, reset_after, mixed))
    if why is not None:
        raise RuntimeError(f"kernel {backend} cannot run here: {why}")
    return backend


# ---------------------------------------------------------------------------
# The operator: torch.ops.grulab.gru_forward / gru_backward / gru_step.
#
# This is the one route into the kernels. A schema, a backend implementation that
# runs the named kernel, a fake (meta) implementation, and one autograd formula
# (_Layer, the operator's Autograd kernel) are what let torch.compile(fullgraph=True)
# and torch.export see the fused layer as one node. Eager calls skip only the
# dispatcher's hops: gru_layer calls _Layer.apply and the backend function
# directly, which is what the dispatcher would call, without its Python round trip
# for a Python kernel (~50 µs a training step).
#
# What each argument may be: any strided layout (non-contiguous, transposed,
# expanded, time-strided). The fused-torch tier reads strides as torch ops do; the
# native kernels copy what is not contiguous at the boundary, in C++ (a contiguous
# tensor costs nothing there).
# Zero sizes: a batch, input or hidden size of 0 runs on fused-torch (torch's own
# ops have the empty-tensor semantics); T = 0 is refused as torch.nn.GRU refuses it.
# Higher order: a backward with create_graph=True, a batched one (is_grads_batched)
# and the torch.func transforms (jacrev, vmap, grad) take the differentiable route,
# grulab.reference's equations under autograd: the same maths, differentiable to
# any order and composable with every transform, at the reference's speed.
# ---------------------------------------------------------------------------

_functorch = torch._C._functorch
_lib = torch.library.Library("grulab", "DEF")
# gru_forward -> (out (T, B, H), h_T (B, H), saved): ``saved`` is what gru_backward needs (the
# gates of every step) when ``save`` is set, as the backend returns it; through the autograd
# formula it is [] (the formula keeps it for its backward, where only it can reach it).
_lib.define("gru_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
            "bool reset_after, bool save, str kernel) -> (Tensor, Tensor, Tensor[])")
_lib.define("gru_backward(Tensor? grad_out, Tensor? grad_hT, Tensor x, Tensor h0, Tensor w_ih, "
            "Tensor w_hh, Tensor out, Tensor[] saved, bool reset_after, bool has_b_ih, bool has_b_hh, "
            "bool need_x, bool need_h0, str kernel) -> Tensor[]")
_lib.define("gru_step(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
            "bool reset_after, str kernel) -> Tensor")


def _runs(kernel: str, batch: int, inputs: int, hidden: int):
    """(tier, extra args) that run ``kernel`` for these sizes: fused-torch where one is 0."""
    if kernel != "fused-torch" and not (batch and inputs and hidden):
        kernel = "fused-torch"
    found = _TIERS.get(kernel)
    if found is None:
        found = _TIERS[kernel] = _tier(kernel)
    return found


_TIERS: dict[str, tuple] = {}


# Under torch.autocast the backends run with autocast off: the bf16 kernel makes its own bf16
# products (in C++), and every other kernel computes float32 (the fallback where the CPU has no
# bf16 units), as it would without autocast (autocast would turn fused-torch's matmuls into
# bf16 ones beside its float32 state).
def _no_autocast(impl):
    def run(*args):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return impl(*args)
        return impl(*args)

    run.__doc__ = impl.__doc__
    return run


@_no_autocast
def _forward_impl(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel):
    """The backend implementation of gru_forward: -> (out, h_T, saved)."""
    tier, extra = _runs(kernel, x.shape[1], x.shape[2], h0.shape[1])
    out, h_T, saved = tier.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, *extra)
    return out, h_T, (list(saved) if save else [])


@_no_autocast
def _backward_impl(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after, has_b_ih,
                   has_b_hh, need_x, need_h0, kernel):
    """The backend implementation of gru_backward: [dx, dh0, dw_ih, dw_hh, db_ih, db_hh], an
    empty tensor for a gradient that is not needed."""
    tier, extra = _runs(kernel, x.shape[1], x.shape[2], h0.shape[1])
    grads = tier.backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, tuple(saved), reset_after,
                          has_b_ih, has_b_hh, need_x, need_h0, *extra)
    return [x.new_empty(0) if g is None else g for g in grads]


@_no_autocast
def _step_impl(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel):
    tier, extra = _runs(kernel, x.shape[0], x.shape[1], h.shape[1])
    return tier.step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, *extra)


_lib.impl("gru_forward", _forward_impl, "CompositeExplicitAutograd")
_lib.impl("gru_backward", _backward_impl, "CompositeExplicitAutograd")
_lib.impl("gru_step", _step_impl, "CompositeExplicitAutograd")


def _saved_shapes(kernel: str, T: int, B: int, I: int, H: int, save: bool) -> list[tuple]:
    if not save:
        return []
    if _runs(kernel, B, I, H)[0] is _TorchTier:
        return [(T, B, 3 * H), (T, B, H)]
    return [(T, B, 4 * H)]


@torch.library.register_fake("grulab::gru_forward")
def _(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel):
    T, B, I = x.shape
    H = h0.shape[1]
    native_tier = _runs(kernel, B, I, H)[0] is _NativeTier  # it saves float32 gates for bfloat16 x
    dtype = torch.float32 if native_tier and x.dtype == torch.bfloat16 else x.dtype
    return (x.new_empty(T, B, H), x.new_empty(B, H),
            [x.new_empty(s, dtype=dtype) for s in _saved_shapes(kernel, T, B, I, H, save)])


@torch.library.register_fake("grulab::gru_backward")
def _(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after, has_b_ih, has_b_hh,
      need_x, need_h0, kernel):
    H = h0.shape[1]
    e = x.new_empty(0)
    return [x.new_empty(x.shape) if need_x else e, x.new_empty(h0.shape) if need_h0 else e,
            x.new_empty(w_ih.shape), x.new_empty(w_hh.shape),
            x.new_empty(3 * H) if has_b_ih else e, x.new_empty(3 * H) if has_b_hh else e]


@torch.library.register_fake("grulab::gru_step")
def _(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel):
    return h.new_empty(h.shape)


def _plain(t: Optional[Tensor]) -> bool:
    """A tensor the kernels can read directly: not a subclass (fake, functional) and not
    wrapped by a torch.func transform (a batched or grad-tracking tensor)."""
    return t is None or (type(t) is Tensor and not _functorch.is_functorch_wrapped_tensor(t)
                         and not _functorch.is_legacy_batchedtensor(t))  # is_grads_batched's


def _differentiable_backward(inputs, need, reset_after, grad_out, grad_hT) -> list:
    """dL/d(x, h0, w_ih, w_hh, b_ih, b_hh) through grulab.reference's equations under autograd:
    the route of a backward with create_graph=True or with batched gradients (vmap). Its own
    graph is differentiable, so gradgradcheck, Hessian-vector products and torch.func hold."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and need[i]]
    with torch.enable_grad():
        out, h_T = reference.gru_layer(*inputs, reset_after)  # (T, B, H), (B, H)
    outs, grads = zip(*[(o, g) for o, g in ((out, grad_out), (h_T, grad_hT)) if g is not None])
    found = torch.autograd.grad(outs, [inputs[i] for i in wanted], grads,
                                create_graph=torch.is_grad_enabled(), allow_unused=True)
    result = [None] * 6
    for i, g in zip(wanted, found):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


class _Layer(torch.autograd.Function):
    """The autograd formula of grulab::gru_forward (the operator's Autograd kernel).

    Forward: the layer, saving what the kernel's backward needs. Backward: the kernel's BPTT
    (gru_backward), or, for a backward whose graph must itself be differentiable
    (create_graph=True) or that runs under vmap, :func:`_differentiable_backward`."""

    # The classic form (ctx in forward) on purpose: the setup_context form binds its arguments
    # with inspect.signature at every apply, ~0.1 ms of Python per training step with cold
    # caches. torch.func transforms never reach it (gru_layer sends them to the reference).
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, kernel: str):
        if _plain(x):
            out, h_T, saved = _forward_impl(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, kernel)
        else:  # fake or functional tensors (compile, export): the backend below autograd
            with torch._C._AutoDispatchBelowAutograd():
                out, h_T, saved = torch.ops.grulab.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh,
                                                               reset_after, True, kernel)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, out)
        ctx.saved = saved
        ctx.reset_after, ctx.kernel = reset_after, kernel
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, h_T

    @staticmethod
    def backward(ctx, grad_out, grad_hT):
        none = (None,) * 8
        if grad_out is None and grad_hT is None:
            return none
        x, h0, w_ih, w_hh, b_ih, b_hh, out = ctx.saved_tensors
        saved = ctx.saved
        need = ctx.needs_input_grad  # (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, kernel)
        if _plain(x):  # eager: a graph of its own (create_graph) or batched gradients need the equations
            if torch.is_grad_enabled() or not (_plain(grad_out) and _plain(grad_hT)):
                grads = _differentiable_backward((x, h0, w_ih, w_hh, b_ih, b_hh), need, ctx.reset_after,
                                                 grad_out, grad_hT)
                return (*grads, None, None)
            backward = _backward_impl
        else:  # fake or functional tensors (compile, export): the operator, traced
            backward = torch.ops.grulab.gru_backward
        has_b_ih, has_b_hh = b_ih is not None and need[4], b_hh is not None and need[5]
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = backward(
            grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, ctx.reset_after, has_b_ih, has_b_hh,
            need[0], need[1], ctx.kernel)
        return (dx if need[0] else None, dh0 if need[1] else None,
                dw_ih if need[2] else None, dw_hh if need[3] else None,
                db_ih if has_b_ih else None, db_hh if has_b_hh else None, None, None)


# _Layer.apply without torch.autograd.Function.apply's Python prologue, whose scan of the
# arguments for torch.func's dead wrappers cost ~20 µs a call: gru_layer calls it only where no
# torch.func transform is active and every argument is a plain tensor.
_apply_layer = torch._C._FunctionBase.__dict__["apply"].__get__(None, _Layer)


def _autograd_kernel(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel):
    if save and torch.is_grad_enabled() and _requires_grad(x, h0, w_ih, w_hh, b_ih, b_hh):
        out, h_T = _Layer.apply(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, kernel)
        return out, h_T, []
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.grulab.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel)


_lib.impl("gru_forward", _autograd_kernel, "Autograd")


def _requires_grad(x, h, w_ih, w_hh, b_ih, b_hh) -> bool:
    return (x.requires_grad or h.requires_grad or w_ih.requires_grad or w_hh.requires_grad
            or (b_ih is not None and b_ih.requires_grad) or (b_hh is not None and b_hh.requires_grad))


# ---------------------------------------------------------------------------
# Public API (the seam grulab.GRU calls)
# ---------------------------------------------------------------------------


def gru_layer(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    reset_after: bool = True,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """One layer, one direction: x (T, B, I), h (B, H) -> (out (T, B, H), h_T (B, H)).

    Same contract as ``grulab.reference.gru_layer``; differentiable with respect
    to every tensor argument, to any order. ``backend`` ("native" | "torch" | a fused
    kernel name of :mod:`grulab.kernels`) overrides the automatic choice (tests, benchmarks).
    """
    if x.dim() != 3 or h.dim() != 2:
        raise ValueError(f"gru_layer: expected x (T, B, I) and h (B, H), got {tuple(x.shape)} and {tuple(h.shape)}")
    if x.shape[0] == 0:
        raise RuntimeError("gru_layer: expected sequence length to be larger than 0, got an empty "
                           "sequence (x of shape (0, B, I))")
    if torch._C._are_functorch_transforms_active():  # torch.func: the composable equations
        return reference.gru_layer(x, h, w_ih, w_hh, b_ih, b_hh, reset_after)
    # The kernel is looked up once per kind of call where the backend is named (grulab.GRU
    # names the one autotune chose): the lookup's Python, with cold caches, cost ~0.1 ms.
    key = _call_kind(backend, x, reset_after)
    kernel = _eager_layers.get(key) if backend is not None else None
    if kernel is None:
        kernel = _kernel_for(backend, x, reset_after)
        if backend is not None:
            _eager_layers[key] = kernel
    save = torch.is_grad_enabled() and _requires_grad(x, h, w_ih, w_hh, b_ih, b_hh)
    if type(x) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
        out, h_T, _ = torch.ops.grulab.gru_forward(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel)
        return out, h_T
    if save:  # what the operator's Autograd kernel would run
        return _apply_layer(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel)
    out, h_T, _ = _forward_impl(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, False, kernel)
    return out, h_T


def _call_kind(backend: Optional[str], x: Tensor, reset_after: bool) -> tuple:
    """The key of the eager lookups: (backend, device, dtype, reset_after, bf16 autocast), the
    device left out for the CPU (x.is_cpu is a fifth of the cost of x.device.type)."""
    if x.is_cpu:
        return (backend, x.dtype, reset_after, kernels.bf16_autocast())
    return (backend, x.device.type, x.dtype, reset_after)


_eager_layers: dict[tuple, str] = {}  # _call_kind -> kernel
_eager_steps: dict[tuple, str] = {}  # _call_kind -> kernel


def forget_choices() -> None:
    """Forget every kernel choice this process has cached (grulab.kernels' per signature and the
    eager lookups here), so that a GRULAB_KERNEL set since takes effect at the next call."""
    kernels._cache.clear()
    _eager_layers.clear()
    _eager_steps.clear()


def gru_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    reset_after: bool = True,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """One step for generation: x (B, I), h (B, H) -> h' (B, H).

    Meant for ``torch.no_grad()`` decoding; if a graph is needed it is the
    differentiable ``gru_layer`` on a length-1 sequence.
    """
    if torch._C._are_functorch_transforms_active():
        return reference.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after).h
    if torch.is_grad_enabled() and _requires_grad(x, h, w_ih, w_hh, b_ih, b_hh):
        return gru_layer(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, reset_after, backend=backend)[1]
    # Eager generation: a token's step takes ~10 µs, and the dispatcher's Python round trip
    # about as much again, so the backend function is called directly, its kernel looked up
    # once per kind of call (GRULAB_KERNEL, which costs a µs to read, at the first step).
    if type(x) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
        kernel = _kernel_for(backend, x, reset_after)
        return torch.ops.grulab.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel)
    key = _call_kind(backend, x, reset_after)
    kernel = _eager_steps.get(key)
    if kernel is None:
        kernel = _eager_steps[key] = _kernel_for(backend, x, reset_after)
    return _step_impl(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel)
