"""Tests of grulab.kernels.fused against torch.nn.GRU and grulab.reference (both tiers)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from grulab.kernels import fused, native
from grulab import kernels, reference

TIERS = [k.name for k in kernels.KERNELS if k.impl == "fused"]


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make_params(I, H, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5
    def u(*shape):
        return ((torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1) * k).requires_grad_()
    w_ih, w_hh = u(3 * H, I), u(3 * H, H)
    b_ih, b_hh = (u(3 * H), u(3 * H)) if bias else (None, None)
    return w_ih, w_hh, b_ih, b_hh


def inputs(T, B, I, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype).requires_grad_()
    h0 = (torch.randn(B, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return x, h0


def run_with_grads(fn, x, h0, params, seed=2):
    """Forward, then backward of a random linear loss on both outputs; returns (out, h_T, grads)."""
    out, h_T = fn(x, h0, *params)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gh = torch.randn(h_T.shape, generator=g, dtype=out.dtype)
    leaves = [x, h0] + [p for p in params if p is not None]
    grads = torch.autograd.grad((out * go).sum() + (h_T * gh).sum(), leaves)
    return out.detach(), h_T.detach(), grads


SHAPES = [  # (T, B, I, H)
    (5, 3, 4, 6),
    (1, 1, 7, 5),   # T = 1, B = 1, I != H
    (4, 1, 3, 8),
    (7, 2, 9, 9),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(tier, shape, reset_after, bias, dtype):
    _check_against_reference(tier, shape, reset_after, bias, dtype)


def assert_same(got, ref, dtype):
    """Outputs, final states and every gradient agree to the dtype's tolerance."""
    tol = TOL[dtype]
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for g_got, g_ref in zip(got[2], ref[2]):
        torch.testing.assert_close(g_got, g_ref, **tol)


def _check_against_reference(tier, shape, reset_after, bias, dtype):
    """Outputs, h_T and every gradient of the fused layer equal the reference's."""
    T, B, I, H = shape
    params = make_params(I, H, bias, dtype)
    x, h0 = inputs(T, B, I, H, dtype)
    ref = run_with_grads(lambda *a: reference.gru_layer(*a, reset_after=reset_after), x, h0, params)
    got = run_with_grads(lambda *a: fused.gru_layer(*a, reset_after=reset_after, backend=tier), x, h0, params)
    assert_same(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("shape", [(3, 8, 5, 64), (2, 5, 3, 67), (2, 1, 28, 256), (3, 16, 5, 64),
                                   (2, 37, 6, 40)])
def test_matches_reference_multithreaded(tier, shape, reset_after, dtype):
    """Shapes big enough that the native time loop splits the hidden units across threads,
    or (float32 packed path: B >= 16, or B >= 8 for reset_after=False) the batch rows."""
    _check_against_reference(tier, shape, reset_after, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 4, 5, 7), (1, 1, 3, 4), (3, 2, 8, 3)])
def test_matches_torch_nn_gru(tier, shape, bias, dtype):
    T, B, I, H = shape
    torch.manual_seed(0)
    gru = torch.nn.GRU(I, H, bias=bias).to(dtype)
    params = (gru.weight_ih_l0, gru.weight_hh_l0,
              gru.bias_ih_l0 if bias else None, gru.bias_hh_l0 if bias else None)
    x, h0 = inputs(T, B, I, H, dtype)

    def nn_gru(x, h0, *_):
        out, h_n = gru(x, h0.unsqueeze(0))
        return out, h_n[0]

    ref = run_with_grads(nn_gru, x, h0, params)
    got = run_with_grads(lambda *a: fused.gru_layer(*a, reset_after=True, backend=tier), x, h0, params)
    assert_same(got, ref, dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
def test_gradcheck(tier, reset_after, bias):
    T, B, I, H = 3, 2, 3, 4
    params = make_params(I, H, bias, torch.float64, seed=3)
    x, h0 = inputs(T, B, I, H, torch.float64, seed=4)
    args = (x, h0) + tuple(p for p in params if p is not None)

    def f(x, h0, w_ih, w_hh, *b):
        b_ih, b_hh = b if b else (None, None)
        return fused.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, backend=tier)

    assert torch.autograd.gradcheck(f, args)


def test_partial_grads_and_unused_outputs(tier):
    """Only h_T used; only some inputs require grad."""
    T, B, I, H = 4, 3, 5, 6
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in make_params(I, H, True, torch.float64))
    w_hh.requires_grad_()
    x, h0 = (t.detach() for t in inputs(T, B, I, H, torch.float64))
    _, h_T = fused.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, backend=tier)
    (g,) = torch.autograd.grad(h_T.sum(), [w_hh])
    w_hh_ref = w_hh.detach().clone().requires_grad_()
    _, h_ref = reference.gru_layer(x, h0, w_ih, w_hh_ref, b_ih, b_hh)
    (g_ref,) = torch.autograd.grad(h_ref.sum(), [w_hh_ref])
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("grad_x, grad_h0", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("use", ["out", "h_T", "both"])
def test_grads_when_x_or_h0_need_none(tier, reset_after, grad_x, grad_h0, use):
    """The backward skips dX and the last dh GEMM when nobody asks for them; the rest must not change."""
    T, B, I, H = 5, 3, 4, 6
    params = make_params(I, H, True, torch.float64)
    x, h0 = (t.detach().requires_grad_(need) for t, need in zip(inputs(T, B, I, H, torch.float64),
                                                               (grad_x, grad_h0)))
    leaves = [t for t in (x, h0) if t.requires_grad] + list(params)
    g = torch.Generator().manual_seed(3)
    go, gh = torch.randn(T, B, H, generator=g, dtype=torch.float64), torch.randn(B, H, generator=g, dtype=torch.float64)

    def loss(out, h_T):
        return {"out": (out * go).sum(), "h_T": (h_T * gh).sum(), "both": (out * go).sum() + (h_T * gh).sum()}[use]

    got = torch.autograd.grad(loss(*fused.gru_layer(x, h0, *params, reset_after, backend=tier)), leaves)
    want = torch.autograd.grad(loss(*reference.gru_layer(x, h0, *params, reset_after)), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("frozen", ["b_ih", "b_hh", "none"])
@pytest.mark.parametrize("shape", [(4, 8, 5, 64), (3, 5, 3, 67), (1, 2, 3, 16)])
def test_sum_loss_frozen_bias_no_h0_grad(tier, shape, frozen, reset_after, dtype, two_threads):
    """out.sum()'s gradient is one value broadcast over time (stride 0), h0 needs no gradient
    (the backward skips its last GEMM) and one bias may be frozen (the bias sums the loop keeps
    must still land in the right one): every gradient equals the reference's."""
    T, B, I, H = shape
    params = make_params(I, H, True, dtype)
    if frozen != "none":
        params[("b_ih", "b_hh").index(frozen) + 2].requires_grad_(False)
    x, h0 = (t.detach() for t in inputs(T, B, I, H, dtype))
    leaves = [p for p in params if p.requires_grad]

    def grads(layer):
        out, h_T = layer(x, h0, *params, reset_after)
        return torch.autograd.grad(out.sum() + 0.5 * h_T.sum(), leaves)

    got = grads(lambda *a: fused.gru_layer(*a, backend=tier))
    want = grads(reference.gru_layer)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("absent", ["b_ih", "b_hh"])
@pytest.mark.parametrize("frozen", ["w_ih", "w_hh"])
def test_one_bias_absent_and_a_frozen_weight(tier, absent, frozen):
    """One bias None and one weight without requires_grad: the autograd formula (fused._Layer)
    maps its gradients to the inputs with the absent bias among them, so every gradient must
    still reach its own tensor (and none the frozen weight)."""
    T, B, I, H = 4, 3, 5, 16
    w_ih, w_hh, b_ih, b_hh = make_params(I, H, True, torch.float64)
    b_ih, b_hh = (None, b_hh) if absent == "b_ih" else (b_ih, None)
    (w_ih if frozen == "w_ih" else w_hh).requires_grad_(False)
    x, h0 = inputs(T, B, I, H, torch.float64)
    params = [w_ih, w_hh, b_ih, b_hh]
    leaves = [t for t in [x, h0, *params] if t is not None and t.requires_grad]

    def grads(layer):
        out, h_T = layer(x, h0, *params, True)
        return torch.autograd.grad((out * out).sum() + h_T.sum(), leaves)

    got = grads(lambda *a: fused.gru_layer(*a, backend=tier))
    want = grads(reference.gru_layer)
    assert len(got) == len(leaves) == 4  # x, h0, the other weight, the present bias
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_a_retained_graph_runs_its_backward_twice(tier):
    """backward(retain_graph=True) twice through one forward: the gates the autograd formula keeps
    (fused._Layer) survive the first backward, and the gradients add up to twice the reference's."""
    T, B, I, H = 3, 2, 4, 8
    params = make_params(I, H, True, torch.float64)
    x, h0 = inputs(T, B, I, H, torch.float64)
    out, h_T = fused.gru_layer(x, h0, *params, backend=tier)
    loss = out.sum() + h_T.sum()
    loss.backward(retain_graph=True)
    loss.backward()
    got = [t.grad.clone() for t in (x, h0, *params)]
    for t in (x, h0, *params):
        t.grad = None
    out, h_T = reference.gru_layer(x, h0, *params)
    (out.sum() + h_T.sum()).backward()
    for a, t in zip(got, (x, h0, *params)):
        torch.testing.assert_close(a, 2 * t.grad, **TOL[torch.float64])


# The float32/float64 native tables; the bf16 ones (bf16 products: other tolerances) have their
# own tests, tests/test_bf16.py.
NATIVE = [t for t in TIERS if t.startswith("native-") and not kernels.BY_NAME[t].bf16]


def _native_case(kernel, T, B, I, H, dtype=torch.float32):
    """(w_ih, w_hh, b_ih, b_hh), x, h0, a seeded dL/dout, the ISA and the native module; skips
    where this CPU cannot run ``kernel``."""
    if native.load() is None or native.load().cpu_supports(kernel[len("native-"):]) is False:
        pytest.skip(f"{kernel} cannot run here")
    params = tuple(p.detach() for p in make_params(I, H, True, dtype))
    x, h0 = (t.detach() for t in inputs(T, B, I, H, dtype))
    go = torch.randn(T, B, H, dtype=dtype, generator=torch.Generator().manual_seed(5))
    return params, x, h0, go, kernel[len("native-"):], native.load()


@pytest.mark.parametrize("B", [8, 20])  # the loop splits the units, or (20) the batch rows
@pytest.mark.parametrize("I", [5, 80])  # dW_ih by the narrow tile (I <= 64) or by MKL
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("kernel", NATIVE)
def test_backward_in_chunks_of_steps(kernel, reset_after, dtype, chunk, I, B, two_threads):
    """The native backward runs its time loop in chunks of steps (csrc/backward.cpp: sized so
    a chunk's gradient buffers stay small; the test passes its own sizes, 7 = T being one
    chunk) and sums the weight gradients chunk by chunk: every gradient, dX and dh_0 included,
    equals the reference's; dh_0 (the same steps, in pieces) and the packed tile's dX are the
    same bits as in one chunk."""
    T, H = 7, 64
    (w_ih, w_hh, b_ih, b_hh), x, h0, go, isa, m = _native_case(kernel, T, B, I, H, dtype)
    gh = torch.randn(B, H, dtype=dtype, generator=torch.Generator().manual_seed(6))
    out, _, saved = m.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, isa, 2)
    got = m.backward(go, gh, x, h0, w_ih, w_hh, out, saved, reset_after, True, True, True, True,
                     isa, 2, chunk)
    whole = m.backward(go, gh, x, h0, w_ih, w_hh, out, saved, reset_after, True, True, True, True,
                       isa, 2, T)
    leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    o, h_T = reference.gru_layer(*leaves, reset_after)
    want = torch.autograd.grad((o * go).sum() + (h_T * gh).sum(), leaves)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, w, b in zip(got, whole, want):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(got[1], whole[1], rtol=0, atol=0)  # dh_0: the same loop, in pieces
    if dtype == torch.float32 and kernel != "native-generic":  # dX by the packed tile: a row is a row
        torch.testing.assert_close(got[0], whole[0], rtol=0, atol=0)


@pytest.mark.parametrize("H", [24, 33])
@pytest.mark.parametrize("I", [1, 4, 9, 17, 24, 28, 41, 64])
@pytest.mark.parametrize("kernel", [k for k in NATIVE if k != "native-generic"])
def test_dw_ih_by_the_narrow_tile_for_every_column_group(kernel, I, H, two_threads):
    """dW_ih = dG_x^T X by gemm_at_narrow (loops.inc) for I <= 64: full groups of columns and a
    left-over group in each tile size; the rows of C (gates r, z, then n: 2H and H) in stripes of
    two vectors, of one (H = 24: 48 = 32 + 16 and 24 = 16 + 8 on AVX-512) and single rows;
    against the reference, and the same bits on 1 and 2 threads."""
    (w_ih, w_hh, b_ih, b_hh), x, h0, go, isa, m = _native_case(kernel, 5, 6, I, H)
    grads = []
    for n in (1, 2):
        out, _, saved = m.forward(x, h0, w_ih, w_hh, b_ih, b_hh, True, True, isa, n)
        grads.append(m.backward(go, None, x, h0, w_ih, w_hh, out, saved, True, True, True, False, False,
                                isa, n, 0)[2])
    leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    o, _ = reference.gru_layer(*leaves, True)
    want = torch.autograd.grad((o * go).sum(), leaves[2])[0]
    torch.testing.assert_close(grads[0], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("B", [16, 20, 37])
@pytest.mark.parametrize("kernel", [k for k in NATIVE if k != "native-generic"])
def test_a_row_is_a_row_whatever_the_thread_split(kernel, B):
    """The packed loops split the hidden units among the threads or, with enough rows, the batch
    rows (csrc/native.h: split_rows); either way a batch row's numbers are made by the same
    register tiles in the same order, and the bias sums go by fixed blocks of rows: every output
    and gradient is the same bits on 1, 2 and 3 threads."""
    (w_ih, w_hh, b_ih, b_hh), x, h0, go, isa, m = _native_case(kernel, 5, B, 6, 64)
    runs = []
    for threads in (1, 2, 3):
        out, h_T, saved = m.forward(x, h0, w_ih, w_hh, b_ih, b_hh, True, True, isa, threads)
        grads = m.backward(go, None, x, h0, w_ih, w_hh, out, saved, True, True, True, True, True,
                           isa, threads, 0)  # dx, dh0, dw_ih, dw_hh, db_ih, db_hh
        runs.append((out, h_T, *grads))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


SMALL_TEAM = """
import sys, torch
from grulab.kernels import native
from grulab import reference
m, isa = native.load(), sys.argv[1]
for T, B, I, H in [(3, 32, 5, 64), (3, 4, 5, 64)]:  # the batch rows split, the units split
    g = torch.Generator().manual_seed(B)
    x, h0 = torch.randn(T, B, I, generator=g), torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(3 * H, I, generator=g) * 0.2, torch.randn(3 * H, H, generator=g) * 0.2
    b_ih, b_hh = torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g)
    go = torch.randn(T, B, H, generator=g)
    out, h_T, saved = m.forward(x, h0, w_ih, w_hh, b_ih, b_hh, True, True, isa, 2)
    got = m.backward(go, None, x, h0, w_ih, w_hh, out, saved, True, True, True, True, True, isa, 2, 0)
    leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    o, _ = reference.gru_layer(*leaves, True)
    want = torch.autograd.grad((o * go).sum(), leaves)
    torch.testing.assert_close(out, o.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("kernel", [k for k in NATIVE if k != "native-generic"])
def test_a_smaller_team_than_asked_for_still_does_every_row_and_panel(kernel):
    """OpenMP may give a time loop fewer threads than it asks for (OMP_THREAD_LIMIT, a call from
    inside another parallel region): every panel must still be packed and every batch row computed."""
    if native.load() is None or native.load().cpu_supports(kernel[len("native-"):]) is False:
        pytest.skip(f"{kernel} cannot run here")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    done = subprocess.run([sys.executable, "-c", SMALL_TEAM, kernel[len("native-"):]], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_path_saves_nothing(tier, dtype):
    T, B, I, H = 5, 2, 3, 4
    params = [p.detach() for p in make_params(I, H, True, dtype)]
    x, h0 = (t.detach() for t in inputs(T, B, I, H, dtype))
    with torch.no_grad():
        out, h_T = fused.gru_layer(x, h0, *params, backend=tier)
    assert out.grad_fn is None and h_T.grad_fn is None
    ref_out, ref_h = reference.gru_layer(x, h0, *params)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(h_T, ref_h, **TOL[dtype])


def test_non_contiguous_input(tier):
    T, B, I, H = 4, 3, 5, 6
    params = [p.detach() for p in make_params(I, H, True, torch.float64)]
    x = torch.randn(B, T, I, dtype=torch.float64).transpose(0, 1)  # (T, B, I), not contiguous
    h0 = torch.randn(B, H, dtype=torch.float64)
    out, h_T = fused.gru_layer(x, h0, *params, backend=tier)
    ref_out, ref_h = reference.gru_layer(x, h0, *params)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("B, I, H", [(1, 7, 10), (3, 7, 10), (6, 7, 10), (1, 28, 256), (5, 9, 70),
                                     (2, 16, 33)])  # I = 16: no masked tail in a zmm; H = 33: one
def test_gru_step_matches_reference(tier, B, I, H, reset_after, bias, dtype):
    params = [None if p is None else p.detach() for p in make_params(I, H, bias, dtype)]
    x = torch.randn(B, I, dtype=dtype)
    h = torch.randn(B, H, dtype=dtype)
    with torch.no_grad():
        got = fused.gru_step(x, h, *params, reset_after, backend=tier)
    ref = reference.gru_step(x, h, *params, reset_after).h
    torch.testing.assert_close(got, ref, **TOL[dtype])


def test_gru_step_with_grad_is_differentiable(tier):
    I, H = 3, 4
    params = make_params(I, H, True, torch.float64)
    x = torch.randn(2, I, dtype=torch.float64)
    h = torch.randn(2, H, dtype=torch.float64)
    h_new = fused.gru_step(x, h, *params, backend=tier)
    assert h_new.grad_fn is not None
    torch.testing.assert_close(h_new, reference.gru_step(x, h, *params).h, rtol=1e-9, atol=1e-9)


def test_backend_reporting():
    assert fused.backend() in ("native", "torch")
    assert isinstance(fused.native_available(), bool)
    assert (fused.backend() == "native") == fused.native_available()


def test_unknown_backend_rejected():
    x, h = torch.randn(2, 1, 3), torch.randn(1, 4)
    w_ih, w_hh = torch.randn(12, 3), torch.randn(12, 4)
    with pytest.raises(ValueError):
        fused.gru_layer(x, h, w_ih, w_hh, backend="cuda-magic")


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    def broken_build(reason):
        raise OSError("no C++ compiler")

    def not_installed():
        raise ModuleNotFoundError("No module named 'grulab._native'")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_import_installed", not_installed)
    monkeypatch.setattr(native, "_jit_build", broken_build)
    monkeypatch.setattr(kernels, "_cache", {})
    monkeypatch.delenv(kernels.ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert fused.backend() == "torch"
    assert fused.backend() == "torch"  # the failure is remembered: no second build, no second warning
    x, h = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    params = [p.detach() for p in make_params(4, 5, True, torch.float64)]
    out, _ = fused.gru_layer(x, h, *params)
    torch.testing.assert_close(out, reference.gru_layer(x, h, *params)[0])
    with pytest.raises(RuntimeError, match="the native GRU kernels are unavailable here"):
        fused.gru_layer(x, h, *params, backend="native")


def test_forced_kernel_the_cpu_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(kernels, "_cache", {})
    monkeypatch.setenv(kernels.ENV, "native-avx2")
    x = torch.randn(3, 2, 4, dtype=torch.float16)  # no native kernel takes float16
    with pytest.raises(RuntimeError, match="GRULAB_KERNEL=native-avx2 cannot run here: float32 and float64 only"):
        kernels.select_name("fused", "cpu", x.dtype, True)
    monkeypatch.setenv(kernels.ENV, "warp-drive")
    with pytest.raises(ValueError, match="expected one of native-amx, native-avx512bf16, native-avx512"):
        kernels.select_name("fused", "cpu", torch.float32, True)


@pytest.mark.parametrize("name", TIERS)
def test_env_forces_each_kernel_and_import_does_not_compile(name):
    import subprocess
    import sys

    code = ("import grulab, grulab.kernels.native as n, grulab.kernels as k\n"
            "assert n._module is None and n._error is None, 'compiled at import'\n"
            "print(k.select('fused').name)")
    env = dict(__import__("os").environ, GRULAB_KERNEL=name)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    if kernels.BY_NAME[name].why_not(kernels.Query()) is None:
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == name
    else:
        assert res.returncode != 0 and "cannot run here" in res.stderr


def test_scratch_reuse_across_calls_and_shapes(tier):
    """Both tiers keep scratch buffers between calls: results of one call must not
    alias them (a later call must not change them) and shapes may grow or shrink."""
    results = []
    for T, B, I, H in [(6, 4, 5, 8), (3, 2, 5, 4), (9, 5, 3, 8), (6, 4, 5, 8)]:
        params = make_params(I, H, True, torch.float32, seed=T)
        x, h0 = inputs(T, B, I, H, torch.float32, seed=B)
        out, h_T, grads = run_with_grads(lambda *a: fused.gru_layer(*a, backend=tier), x, h0, params)
        ref = run_with_grads(reference.gru_layer, x, h0, params)
        for a, b in zip(grads, ref[2]):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
        results.append((grads, [g.clone() for g in grads]))
    for grads, copies in results:  # nothing returned earlier was overwritten later
        for a, b in zip(grads, copies):
            assert torch.equal(a, b)
    fused.release_scratch()
    _, _, again = run_with_grads(lambda *a: fused.gru_layer(*a, backend=tier), x, h0, params)
    for a, b in zip(again, results[-1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [3, 4])
@pytest.mark.parametrize("shape", [(4, 9, 5, 67), (3, 8, 6, 128), (3, 40, 6, 64)])
def test_oversubscribed_threads_share_panels(tier, shape, threads):
    """More threads than cores: the OS runs them unevenly, so threads take each other's
    panels (forward and backward of the float32 packed path); results must not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            _check_against_reference(tier, shape, True, True, torch.float32)
    finally:
        torch.set_num_threads(before)
