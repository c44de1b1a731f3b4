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
  weight gradients of all steps are summed by one big GEMM each at the end.

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
* ``"native"``: ``csrc/gru.cpp``, the whole time loop in C++ with the gate
  arithmetic fused in vectorised loops, compiled on first use with
  ``torch.utils.cpp_extension`` (float32/float64 CPU tensors only). Its
  threads split the *hidden units*: thread k owns units [j0, j1), computes
  their three gate columns of h W_hh^T with a single-threaded GEMM on its own
  rows of W_hh (which stay in its core's cache) and then their gates, and meets
  the other threads at one barrier per step. The backward splits dL/dh the same
  way. A small-GEMM BLAS call on all cores would instead fork and join inside
  every step, for a GEMM too small to keep two cores busy. For float32 with
  ``reset_after=True`` on AVX2+FMA CPUs the per-step GEMMs are not BLAS calls
  but the file's own micro-kernel on weights packed once per call, with the
  gate arithmetic applied to the register tile (and the input projection done
  per step by the same kernel); float64 and ``reset_after=False`` use BLAS.
  On that path a thread that has finished its own units' panels takes the
  remaining panels of a slower thread (atomic claims, same results bit for
  bit), so a vCPU that runs slow for a moment does not hold up the step.

``GRULAB_FUSED_BACKEND=torch|native`` forces a tier (``native`` raises if the
extension cannot be built); unset, the native tier is tried and, if it does not
compile, one warning is issued and the torch tier is used.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["gru_layer", "gru_step", "backend", "native_available", "release_scratch"]

_BACKEND_ENV = "GRULAB_FUSED_BACKEND"


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
    if _native_module is not None:
        _native_module.release_scratch()


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
# Tier 2: native (C++), built on first use
# ---------------------------------------------------------------------------

_native_module = None  # the compiled extension, once loaded
_native_error: Optional[str] = None  # why it could not be loaded


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags (the build uses -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _cache_dir() -> Path:
    """Build directory for the extension, one per torch version, Python and CPU."""
    root = os.environ.get("GRULAB_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "grulab"
    tag = (f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{platform.machine()}-{_cpu_tag()}")
    return base / "native" / tag.replace("+", "_")


def _build_native():
    """Compile (or load from the cache) csrc/gru.cpp; raises on failure."""
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name("csrc") / "gru.cpp"
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing from the installed package")
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    # -march=native: the build is for this machine only (the cache is per machine).
    # -ffast-math lets gcc vectorise exp() through glibc's libmvec.
    # -fopenmp: the time loop's threads (the same libgomp that torch uses).
    return load(
        name="grulab_gru_native",
        sources=[str(src)],
        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def _native():
    """The native extension, building it on first call; None if unavailable."""
    global _native_module, _native_error
    if _native_module is not None:  # fast path: generation calls this once per token
        return _native_module
    choice = os.environ.get(_BACKEND_ENV, "").strip().lower()
    if _native_module is None and _native_error is None:
        if choice == "torch":
            _native_error = f"disabled by {_BACKEND_ENV}=torch"
            return None
        try:
            _native_module = _build_native()
        except Exception as exc:  # compiler missing, build error, ...
            last_line = (str(exc).strip().splitlines() or [""])[-1]
            _native_error = f"{type(exc).__name__}: {last_line}"
            if choice != "native":
                warnings.warn(
                    f"grulab: C++ GRU kernel could not be built ({_native_error}); using the "
                    f"slower pure-PyTorch tier. Fix: install g++ and ninja (pip install ninja), "
                    f"or set {_BACKEND_ENV}=torch to silence this.", RuntimeWarning, stacklevel=3)
    if _native_module is None and choice == "native":
        raise RuntimeError(
            f"grulab: {_BACKEND_ENV}=native but the C++ GRU kernel is unavailable "
            f"({_native_error}); install g++ and ninja, or unset {_BACKEND_ENV}")
    return _native_module


def native_available() -> bool:
    """True if the C++ tier is usable (compiles it on first call)."""
    return _native() is not None


def backend() -> str:
    """The tier used for CPU float32/float64 tensors: ``"native"`` or ``"torch"``."""
    return "native" if native_available() else "torch"


class _NativeTier:
    """Thin adapter from the autograd wrapper to the C++ extension."""

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, save: bool):
        out, h_T, saved = _native_module.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, save)
        return out, h_T, (saved,)

    @staticmethod
    def backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, reset_after: bool,
                 has_b_ih: bool, has_b_hh: bool, need_x: bool, need_h0: bool):
        return tuple(_native_module.backward(grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved[0],
                                             reset_after, has_b_ih, has_b_hh, need_x, need_h0))

    @staticmethod
    def step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after: bool):
        return _native_module.step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after)


_NATIVE_DTYPES = (torch.float32, torch.float64)


def _pick_tier(name: Optional[str], x: Tensor) -> type:
    """The tier for this call. The C++ code checks the other tensors (device, dtype, shape)."""
    if name is None:
        if x.is_cpu and x.dtype in _NATIVE_DTYPES and _native() is not None:
            return _NativeTier
        return _TorchTier
    if name == "torch":
        return _TorchTier
    if name == "native":
        if _native() is None:
            raise RuntimeError(f"grulab: native GRU tier unavailable ({_native_error})")
        return _NativeTier
    raise ValueError(f"grulab: unknown GRU backend {name!r} (use 'native' or 'torch')")


# ---------------------------------------------------------------------------
# Autograd wrapper (shared by both tiers)
# ---------------------------------------------------------------------------


class _FusedGRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tier, reset_after, x, h0, w_ih, w_hh, b_ih, b_hh):
        out, h_T, saved = tier.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out, *saved)  # saved: the tier's tuple of tensors
        ctx.tier, ctx.reset_after = tier, reset_after
        ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, h_T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_hT):
        x, h0, w_ih, w_hh, out, *saved = ctx.saved_tensors
        if grad_out is None and grad_hT is None:
            return (None,) * 8
        need = ctx.needs_input_grad  # (tier, reset_after, x, h0, w_ih, w_hh, b_ih, b_hh)
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = ctx.tier.backward(
            grad_out, grad_hT, x, h0, w_ih, w_hh, out, saved, ctx.reset_after,
            ctx.has_b_ih and need[6], ctx.has_b_hh and need[7], need[2], need[3])
        return (None, None, dx, dh0,
                dw_ih if need[4] else None, dw_hh if need[5] else None,
                db_ih, db_hh)


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
    to every tensor argument. ``backend`` ("native" | "torch") overrides the
    automatic choice (used by tests and benchmarks).
    """
    if x.dim() != 3 or h.dim() != 2:
        raise ValueError(f"gru_layer: expected x (T, B, I) and h (B, H), got {tuple(x.shape)} and {tuple(h.shape)}")
    if x.shape[0] == 0:
        raise ValueError("gru_layer: empty sequence (T == 0)")
    args = (x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
            None if b_ih is None else b_ih.contiguous(), None if b_hh is None else b_hh.contiguous())
    tier = _pick_tier(backend, x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _FusedGRUFunction.apply(tier, reset_after, *args)
    out, h_T, _ = tier.forward(*args, reset_after, False)  # inference: save nothing
    return out, h_T


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
    return _pick_tier(backend, x).step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after)
