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
  built when grulab is installed (:mod:`grulab.native`) and compiled once per
  instruction set, so :mod:`grulab.kernels` can pick ``native-avx512``,
  ``native-avx2`` or ``native-generic`` for the CPU at hand. Its threads split
  the *hidden units*: thread k owns units [j0, j1), computes their three gate
  columns of h W_hh^T with a single-threaded GEMM on its own rows of W_hh
  (which stay in its core's cache) and then their gates, and meets the other
  threads at one barrier per step (how many threads: measured per call shape by
  :mod:`grulab.threads`, so a core taken by another process does not stall every
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

Both tiers are reached through torch operators (``torch.ops.grulab.gru_forward``,
``gru_backward``, ``gru_step``) with fake implementations and an autograd
formula, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one node
per layer. In eager mode the same tier functions and formula are called
directly (``_EagerLayer``, and ``gru_step``'s lookup), since the custom op's
Python argument handling costs more than a small layer's arithmetic; a native
kernel's training step goes further: its backward is a C++ autograd function
(``csrc/autograd.cpp``), so the autograd engine reaches the kernel without Python.
:mod:`grulab.kernels` decides which kernel runs (``grulab kernels`` shows it);
``GRULAB_KERNEL=<name>`` forces one.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

from . import kernels, native, threads

__all__ = ["gru_layer", "gru_step", "backend", "native_available", "release_scratch"]


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
# Tier 2: native (C++, csrc/), one build for every x86-64 CPU (grulab.native)
# ---------------------------------------------------------------------------


class _NativeTier:
    """Thin adapter to the C++ extension; ``isa`` picks the instruction set's loops.

    The time loops' thread count is chosen per call shape by :mod:`grulab.threads`
    (measured, so a core taken by another process does not stall every step)."""

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, save: bool, isa: str):
        key = ("forward", isa, tuple(x.shape), h0.shape[1], x.dtype, reset_after, save)
        out, h_T, saved = threads.timed(key, lambda n: native.load().forward(
            x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, isa, n))
        return out, h_T, ((saved,) if save else None)

    @staticmethod
    def backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after: bool,
                 has_b_ih: bool, has_b_hh: bool, need_x: bool, need_h0: bool, isa: str):
        key = ("backward", isa, tuple(x.shape), h0.shape[1], x.dtype, reset_after, need_x)
        return tuple(threads.timed(key, lambda n: native.load().backward(
            grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved[0], reset_after, has_b_ih, has_b_hh,
            need_x, need_h0, isa, n, 0)))  # 0: the C++ side sizes the chunks of steps

    @staticmethod
    def step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after: bool, isa: str):
        return native.load().step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, isa)

    @staticmethod
    def train(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, isa: str):
        """Eager training: the forward now, and outputs whose grad_fn is the native backward in
        C++ (csrc/autograd.cpp), so no Python runs between the autograd engine and the kernel.
        Same formula and results as ``_EagerLayer`` with this tier; one thread count for the
        forward and its backward."""
        key = ("train", isa, tuple(x.shape), h0.shape[1], x.dtype, reset_after, x.requires_grad)
        out, h_T = threads.later(key, lambda n: native.load().layer_train(
            x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, isa, n))
        return out, h_T


def _tier(kernel: str):
    """(tier, extra args) for a fused kernel name from grulab.kernels."""
    if kernel == "fused-torch":
        return _TorchTier, ()
    if kernel.startswith("native-"):
        return _NativeTier, (kernel[len("native-"):],)
    raise ValueError(f"grulab: {kernel!r} is not a fused GRU kernel")


def native_available() -> bool:
    """True if the C++ tier is usable (loads it, or builds it on first use)."""
    return native.load() is not None


def backend() -> str:
    """The tier used for CPU float32 tensors: ``"native"`` or ``"torch"``."""
    return "native" if kernels.select("fused").name.startswith("native") else "torch"


def _kernel_for(backend: Optional[str], x: Tensor, reset_after: bool) -> str:
    """The fused kernel for this call: ``backend`` if given ("native" = the best native one,
    "torch" = fused-torch, or a kernel name), else grulab.kernels' choice."""
    if backend is None:
        return kernels.select_name("fused", x.device.type, x.dtype, reset_after)
    if backend == "torch":
        return "fused-torch"
    if backend == "native":
        name, why = kernels.first_native(kernels.Query(x.device.type, x.dtype, reset_after))
        if name is None:
            raise RuntimeError(f"grulab: native GRU tier unavailable ({why})")
        return name
    k = kernels.BY_NAME.get(backend)
    if k is None or k.impl != "fused":
        raise ValueError(f"grulab: unknown GRU backend {backend!r} (use 'native', 'torch' or a "
                         f"fused kernel name: {', '.join(n for n, k in kernels.BY_NAME.items() if k.impl == 'fused')})")
    why = k.why_not(kernels.Query(x.device.type, x.dtype, reset_after))
    if why is not None:
        raise RuntimeError(f"grulab: kernel {backend} cannot run here: {why}")
    return backend


# ---------------------------------------------------------------------------
# Torch operators: torch.ops.grulab.gru_forward / gru_backward / gru_step.
# A custom op with a fake (meta) implementation and an autograd formula is
# what lets torch.compile(fullgraph=True) and torch.export see the fused layer
# as one node instead of tracing into C++.
# ---------------------------------------------------------------------------


def _saved_shapes(kernel: str, T: int, B: int, H: int, save: bool) -> list[tuple]:
    if not save:
        return []
    if kernel == "fused-torch":
        return [(T, B, 3 * H), (T, B, H)]
    return [(T, B, 4 * H)]


@torch.library.custom_op("grulab::gru_forward", mutates_args=())
def _op_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                b_hh: Optional[Tensor], reset_after: bool, save: bool,
                kernel: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    tier, extra = _tier(kernel)
    out, h_T, saved = tier.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, *extra)
    return out, h_T, (list(saved) if save else [])


@_op_forward.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel):
    T, B, _ = x.shape
    H = h0.shape[1]
    return (x.new_empty(T, B, H), x.new_empty(B, H),
            [x.new_empty(s) for s in _saved_shapes(kernel, T, B, H, save)])


@torch.library.custom_op("grulab::gru_backward", mutates_args=())
def _op_backward(grad_out: Optional[Tensor], grad_hT: Optional[Tensor], x: Tensor, h0: Tensor,
                 w_ih: Tensor, w_hh: Tensor, out: Tensor, saved: list[Tensor], reset_after: bool,
                 has_b_ih: bool, has_b_hh: bool, need_x: bool, need_h0: bool,
                 kernel: str) -> list[Tensor]:
    """[dx, dh0, dw_ih, dw_hh, db_ih, db_hh]; a gradient that is not needed is an empty tensor."""
    tier, extra = _tier(kernel)
    grads = tier.backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, tuple(saved), reset_after,
                          has_b_ih, has_b_hh, need_x, need_h0, *extra)
    return [x.new_empty(0) if g is None else g for g in grads]


@_op_backward.register_fake
def _(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after, has_b_ih, has_b_hh,
      need_x, need_h0, kernel):
    H = h0.shape[1]
    e = x.new_empty(0)
    return [x.new_empty(x.shape) if need_x else e, x.new_empty(h0.shape) if need_h0 else e,
            x.new_empty(w_ih.shape), x.new_empty(w_hh.shape),
            x.new_empty(3 * H) if has_b_ih else e, x.new_empty(3 * H) if has_b_hh else e]


def _setup_context(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save, kernel = inputs
    out, _, saved = output
    ctx.save_for_backward(x, h0, w_ih, w_hh, out, *saved)
    ctx.reset_after, ctx.kernel = reset_after, kernel
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None


def _grads(backward, ctx, grad_out, grad_hT) -> tuple:
    """(dx, dh0, dw_ih, dw_hh, db_ih, db_hh), None where not needed, from ``backward``
    (the operator torch.ops.grulab.gru_backward, or the tier's function in eager mode)."""
    x, h0, w_ih, w_hh, out, *saved = ctx.saved_tensors
    if grad_out is None and grad_hT is None:
        return (None,) * 6
    need = ctx.needs_input_grad  # (x, h0, w_ih, w_hh, b_ih, b_hh, ...)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = backward(
        grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, ctx.reset_after,
        ctx.has_b_ih and need[4], ctx.has_b_hh and need[5], need[0], need[1], ctx.kernel)
    return (dx if need[0] else None, dh0 if need[1] else None,
            dw_ih if need[2] else None, dw_hh if need[3] else None,
            db_ih if ctx.has_b_ih and need[4] else None, db_hh if ctx.has_b_hh and need[5] else None)


def _backward(ctx, grad_out, grad_hT, _grad_saved):
    return _grads(torch.ops.grulab.gru_backward, ctx, grad_out, grad_hT) + (None, None, None)


_op_forward.register_autograd(_backward, setup_context=_setup_context)


def _eager_backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after, has_b_ih,
                    has_b_hh, need_x, need_h0, kernel):
    tier, extra = _tier(kernel)
    return tier.backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, tuple(saved), reset_after,
                         has_b_ih, has_b_hh, need_x, need_h0, *extra)


class _EagerLayer(torch.autograd.Function):
    """Training in eager mode: the operator's tier calls and autograd formula, without its
    Python round trip (the custom op's argument handling costs ~0.3 ms per call each way,
    ~8% of a training step at (B, T, I, H) = (32, 35, 28, 256)). Under torch.compile,
    torch.export and jit tracing, and for tensor subclasses (fake tensors), gru_layer
    calls the operator instead, so graphs still see one node per layer."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, kernel: str):
        tier, extra = _tier(kernel)
        out, h_T, saved = tier.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, *extra)
        _setup_context(ctx, (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, kernel),
                       (out, h_T, list(saved)))
        return out, h_T

    @staticmethod
    def backward(ctx, grad_out, grad_hT):
        return _grads(_eager_backward, ctx, grad_out, grad_hT) + (None, None)


@torch.library.custom_op("grulab::gru_step", mutates_args=())
def _op_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
             b_hh: Optional[Tensor], reset_after: bool, kernel: str) -> Tensor:
    tier, extra = _tier(kernel)
    return tier.step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, *extra)


@_op_step.register_fake
def _(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel):
    return h.new_empty(h.shape)


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
    to every tensor argument. ``backend`` ("native" | "torch" | a fused kernel
    name of :mod:`grulab.kernels`) overrides the automatic choice (tests, benchmarks).
    """
    if x.dim() != 3 or h.dim() != 2:
        raise ValueError(f"gru_layer: expected x (T, B, I) and h (B, H), got {tuple(x.shape)} and {tuple(h.shape)}")
    if x.shape[0] == 0:
        raise ValueError("gru_layer: empty sequence (T == 0)")
    if type(x) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
        args = _contiguous(x, h, w_ih, w_hh, b_ih, b_hh)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        kernel = _kernel_for(backend, x, reset_after)
        out, h_T, _ = torch.ops.grulab.gru_forward(*args, reset_after, save, kernel)  # inference saves nothing
        return out, h_T
    # Eager: the kernel and its tier looked up once per kind of call where the backend is
    # named (grulab.GRU names the one autotune chose), since the lookup's Python, run with
    # cold caches after other work, cost ~0.1 ms a call; GRULAB_KERNEL is read per call otherwise.
    key = _call_kind(backend, x, reset_after)
    found = _eager_layers.get(key) if backend is not None else None
    if found is None:
        kernel = _kernel_for(backend, x, reset_after)
        found = (kernel, *_tier(kernel))
        if backend is not None:
            _eager_layers[key] = found
    kernel, tier, extra = found
    save = torch.is_grad_enabled() and (
        x.requires_grad or h.requires_grad or w_ih.requires_grad or w_hh.requires_grad
        or (b_ih is not None and b_ih.requires_grad) or (b_hh is not None and b_hh.requires_grad))
    if save and tier is _NativeTier:  # the C++ side makes its own contiguous copies
        return _NativeTier.train(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, *extra)
    args = _contiguous(x, h, w_ih, w_hh, b_ih, b_hh)
    if save:
        return _EagerLayer.apply(*args, reset_after, kernel)
    out, h_T, _ = tier.forward(*args, reset_after, False, *extra)
    return out, h_T


def _contiguous(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _call_kind(backend: Optional[str], x: Tensor, reset_after: bool) -> tuple:
    """The key of the eager lookups: (backend, device, dtype, reset_after), the device left
    out for the CPU (x.is_cpu is a fifth of the cost of x.device.type)."""
    return (backend, x.dtype, reset_after) if x.is_cpu else (backend, x.device.type, x.dtype, reset_after)


_eager_layers: dict[tuple, tuple] = {}  # (backend, device, dtype, reset_after) -> (kernel, tier, extra args)
_eager_steps: dict[tuple, tuple] = {}  # (backend, device, dtype, reset_after) -> (function, extra args)


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

    Meant for ``torch.no_grad()`` decoding; if a graph is needed it falls back
    to the differentiable ``gru_layer`` on a length-1 sequence.
    """
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h, w_ih, w_hh, b_ih, b_hh)):
        return gru_layer(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, reset_after, backend=backend)[1]
    if torch.compiler.is_compiling():  # compile / export: the operator, so the graph has one node
        kernel = _kernel_for(backend, x, reset_after)
        return torch.ops.grulab.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after, kernel)
    # Eager generation: a token's step takes ~10 µs, and the dispatcher's Python
    # round trip for a custom op about as much again, so the tier's function is
    # called directly, looked up once per kind of call (GRULAB_KERNEL, which costs
    # a µs to read, is read at the first step of each kind).
    key = _call_kind(backend, x, reset_after)
    step = _eager_steps.get(key)
    if step is None:
        tier, extra = _tier(_kernel_for(backend, x, reset_after))
        fn = native.load().step if tier is _NativeTier else tier.step
        step = _eager_steps[key] = (fn, extra)
    return step[0](x, h, w_ih, w_hh, b_ih, b_hh, reset_after, *step[1])

