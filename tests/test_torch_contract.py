"""PyTorch's own CPU tests of nn.GRU and nn.GRUCell, ported to grulab.GRU / grulab.GRUCell.

grulab.GRU and grulab.GRUCell promise to be drop-ins for torch.nn.GRU and
torch.nn.GRUCell. This file holds what torch itself checks of those modules on
the CPU, rewritten here in our own code (read in torch's public sources, none of
their code copied):

* ``test/test_modules.py`` over the ModuleInfo samples of
  ``torch/testing/_internal/common_modules.py`` (module_inputs_torch_nn_RNN_GRU,
  module_inputs_torch_nn_RNN_GRU_Cell, module_error_inputs_torch_nn_RNN_GRU and
  _Cell): forward against the no-batch-dim reference, factory kwargs, repr,
  pickle, non-contiguous tensors, gradcheck, gradgradcheck, memory format,
  meta-device init, errors, ``.to`` / ``.to_empty``;
* ``test/test_nn.py``: test_RNN_cell, test_RNN_cell_forward_zero_hidden_size,
  test_RNN_cell_no_broadcasting, test_rnn_args_check, test_cudnn_forward_exception
  (runs on the CPU), test_rnn_initial_hidden_state,
  test_projections_errors_on_gru_and_rnn, test_error_RNN_seq_len_zero,
  test_RNN_input_size_zero, test_RNN_dropout_state and test_RNN_change_dropout
  (their CPU arm), _test_RNN_cpu_vs_cudnn (as grulab against torch.nn.GRU on the
  CPU), test_cudnn_weight_tying and test_partial_flat_weights (their CPU part),
  test_rnn_weight_norm (LSTM there, GRU here), test_rnn_retain_variables,
  test_GRU_grad_and_gradgrad, test_variable_sequence (LSTM there, GRU here);
* what issue 21 adds: every argument in any strided layout, zero sizes, double
  backward, batched gradients and torch.func, constructor checks, NaN/Inf,
  PackedSequence.

Every test runs on every kernel of grulab.kernels (each fused kernel forced
with GRULAB_KERNEL and impl="fused"; "torch" and "reference" through impl=),
plus impl="auto", in both cell forms where the form matters:
reset_after=True is compared with torch.nn.GRU / GRUCell, reset_after=False
with grulab's reference implementation, both in float64 with the same weights.
A kernel this CPU cannot run is skipped with its reason.

The bf16 kernel (bf16 products with float32 sums, ``Kernel.bf16``) runs every test under
``torch.autocast("cpu", dtype=torch.bfloat16)``: its float32 results are held to 3e-2 of the
float64 yardstick, relative to the largest entry (``tol``), while the yardsticks, torch's
errors included, compute outside autocast (``plain``). Its float64 cases (gradcheck,
gradgradcheck, the float64 yardstick comparisons) skip: autocast leaves float64 alone.

Zero-size cases (B = 0, hidden or input size 0) each run in a process of their
own (a fork of a clean server process, see ``isolated``), so a kernel that dies
on them (SIGFPE) fails its tests instead of ending pytest.

Left out, and why:

* CUDA / cuDNN / multi-GPU only: test_cpu_gpu_parity, test_multiple_device_transfer
  (test_modules.py); test_RNN_cpu_vs_cudnn_* (its CPU comparison is kept as
  test_options_against_torch), test_rnn_fused, test_cudnn_weight_format,
  test_RNN_cudnn_weight_norm, test_cudnn_rnn_dropout_states_device,
  test_rnn_check_device, the CUDA move of test_partial_flat_weights, the cuDNN
  double-backward error of _test_rnn_mod, and the ModuleInfo decorators, which
  are all cuDNN/MIOpen expected failures.
* LSTM / RNN only: proj_size (only GRU's ValueError is ported), nonlinearity
  (test_RNN_nonlinearity*, the relu samples), test_RNN_dropout (relies on a relu
  RNN being linear), LSTMCell tests, test_projections_lstm_*.
* Not about the module: test_check_inplace (no inplace argument),
  test_if_train_and_eval_modes_differ (checks a ModuleInfo flag), the
  PackedSequence utility tests of test/nn/test_packed_sequence.py (they test
  torch.nn.utils.rnn, not the GRU; GRUs on packed input are tested here).
* Not a torch contract: vmap over GRU's forward (torch.nn.GRU has no batching
  rule for aten::gru.input; GRUCell's forward is vmapped here, as torch does),
  forward-mode AD (not in torch's GRU tests), half and bfloat16 inputs (torch's CPU GRU
  tests run float32 and float64; bfloat16 parameters are tested in test_bf16.py), GRUCell's
  bias type (torch does not check it).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import traceback
import warnings
from itertools import product
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence
from torch.testing import make_tensor

import grulab
from grulab import kernels, reference
from grulab.kernels import fused

# ---------------------------------------------------------------------------
# Kernels: each one forced, plus impl="auto"
# ---------------------------------------------------------------------------

KERNEL_NAMES = [k.name for k in kernels.KERNELS]
TARGETS = KERNEL_NAMES + ["auto"]
FUSED = [k.name for k in kernels.KERNELS if k.impl == "fused"]
ENV = getattr(kernels, "ENV", "GRULAB_KERNEL")
FORMS = [True, False]  # reset_after
DTYPES = [torch.float32, torch.float64]
AUTOCAST = {k.name for k in kernels.KERNELS if k.bf16}  # run under torch.autocast("cpu", torch.bfloat16)


def impl_of(target: str) -> str:
    """The ``impl=`` a module gets for a target (a fused kernel: "fused", forced by GRULAB_KERNEL)."""
    return "fused" if target in FUSED else ("auto" if target == "auto" else kernels.BY_NAME[target].impl)


def _clear_kernel_caches() -> None:
    """The kernel choice is cached per signature (grulab.kernels) and per kind of call (fused)."""
    fused.forget_choices()


@contextlib.contextmanager
def use_target(target: str):
    """GRULAB_KERNEL=<target> for a fused kernel, unset otherwise; caches cleared on both sides."""
    before = os.environ.get(ENV)
    if target in FUSED:
        os.environ[ENV] = target
    else:
        os.environ.pop(ENV, None)
    _clear_kernel_caches()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16) if target in AUTOCAST else contextlib.nullcontext():
            yield target
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
        _clear_kernel_caches()


def why_not(target: str, dtype: torch.dtype = torch.float32, reset_after: bool = True) -> Optional[str]:
    if target == "auto":
        return None
    return kernels.BY_NAME[target].why_not(kernels.Query("cpu", dtype, reset_after, target in AUTOCAST))


def need(target: str, dtype: torch.dtype = torch.float32, reset_after: bool = True) -> None:
    """Skip the test where the target cannot run this dtype and cell form on this CPU."""
    why = why_not(target, dtype, reset_after)
    if why is not None:
        pytest.skip(f"{target}: {why}")


@pytest.fixture(params=TARGETS)
def kernel(request):
    """Each kernel of grulab.kernels, forced, and impl="auto"."""
    with use_target(request.param):
        yield request.param


def make_gru(target: str, *args, reset_after: bool = True, **kwargs) -> grulab.GRU:
    return grulab.GRU(*args, impl=impl_of(target), reset_after=reset_after, **kwargs)


def make_cell(target: str, *args, reset_after: bool = True, **kwargs) -> grulab.GRUCell:
    return grulab.GRUCell(*args, impl=impl_of(target), reset_after=reset_after, **kwargs)


# ---------------------------------------------------------------------------
# The yardstick: torch.nn.GRU (reset-after) or grulab's reference (reset-before), float64
# ---------------------------------------------------------------------------


def twin(m: nn.Module, dtype: torch.dtype = torch.float64, prepare: Optional[Callable] = None) -> nn.Module:
    """m's yardstick with m's weights: torch.nn.GRU / GRUCell for reset_after=True, grulab's
    impl="reference" for reset_after=False; ``prepare`` is applied to it before the weights load."""
    if isinstance(m, grulab.GRUCell):
        if m.reset_after:
            r = torch.nn.GRUCell(m.input_size, m.hidden_size, bias=m.bias, dtype=dtype)
        else:
            r = grulab.GRUCell(m.input_size, m.hidden_size, bias=m.bias, dtype=dtype,
                               impl="reference", reset_after=False)
    else:
        kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                  bidirectional=m.bidirectional, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if m.reset_after:
                r = torch.nn.GRU(m.input_size, m.hidden_size, **kw)
            else:
                r = grulab.GRU(m.input_size, m.hidden_size, **kw, impl="reference", reset_after=False)
    if prepare is not None:
        r = prepare(r) or r
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(False)  # torch.nn.GRU's params cannot be swapped
    try:
        r.load_state_dict({k: v.detach().to(dtype) for k, v in m.state_dict().items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    for n, p in r.named_parameters():
        p.requires_grad_(n not in frozen)
    r.train(m.training)
    r.forward = plain(r.forward)
    return r


def plain(fn: Callable) -> Callable:
    """fn run outside autocast: a yardstick computes as it would without the bf16 kernel's autocast."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return run


def to64(a):
    """A float64, contiguous, separate copy of a tensor / PackedSequence argument (same requires_grad)."""
    if a is None:
        return None
    if isinstance(a, PackedSequence):
        return PackedSequence(to64(a.data), a.batch_sizes, a.sorted_indices, a.unsorted_indices)
    return a.detach().to(torch.float64).contiguous().requires_grad_(a.requires_grad)


def leaf(t: Tensor, requires_grad: bool = True) -> Tensor:
    """t as a leaf that keeps its strides (a view of its storage)."""
    return t.detach().requires_grad_(requires_grad)


def outputs_of(res) -> list[Tensor]:
    if isinstance(res, tuple):
        out, h = res
        return [out.data if isinstance(out, PackedSequence) else out, h]
    return [res]


ARG_NAMES = ("x", "h0")


def forward_backward(m: nn.Module, args: tuple, grads_out: Optional[list] = None, seed: int = 7):
    """m(*args), then the gradients of sum(output * grad_output) over every output with respect to
    each argument that requires grad and every parameter. Returns (outputs, {name: gradient})."""
    res = m(*args)
    outs = outputs_of(res)
    if grads_out is None:
        g = torch.Generator().manual_seed(seed)
        grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    named = []
    for name, a in zip(ARG_NAMES, args):
        t = a.data if isinstance(a, PackedSequence) else a
        if isinstance(t, Tensor) and t.requires_grad:
            named.append((name, t))
    named += [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [t for _, t in named],
                                [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    return [o.detach() for o in outs], {n: g for (n, _), g in zip(named, grads)}


TOL = {torch.float32: (1e-4, 2e-5), torch.float64: (1e-8, 1e-10)}  # (rtol, atol relative to the largest entry)
BF16_TOL = (0.0, 3e-2)  # float32 calls under autocast (bf16 products): 3e-2 of the largest entry


def tol(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results of this dtype; float32 under bf16 autocast gets bf16's."""
    return BF16_TOL if dtype == torch.float32 and kernels.bf16_autocast() else TOL[dtype]


def mismatch(got: Optional[Tensor], want: Tensor, dtype: torch.dtype, what: str) -> Optional[str]:
    """None if got equals want to the dtype's tolerance, else a line saying how far apart they are."""
    if got is None:
        return f"{what}: no gradient (want one of shape {tuple(want.shape)})"
    if tuple(got.shape) != tuple(want.shape):
        return f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    if got.numel() == 0:
        return None
    rtol, atol = tol(dtype)
    g, w = got.detach().double(), want.detach().double()
    big = float(w.abs().max()) if bool(torch.isfinite(w).all()) else float(w[torch.isfinite(w)].abs().max(initial=0))
    err = (g - w).abs()
    ok = (err <= atol * max(1.0, big) + rtol * w.abs()) | (torch.isnan(g) & torch.isnan(w)) | (g == w)
    if bool(ok.all()):
        return None
    bad = ~ok
    worst = float(torch.where(bad, err.nan_to_num(float("inf")), torch.zeros_like(err)).max())
    return (f"{what}: {int(bad.sum())} of {g.numel()} entries off, max |got - want| = {worst:.3g} "
            f"where the largest |want| is {big:.3g}")


def assert_matches(got, want, dtype, what: str = "") -> None:
    """(outputs, grads) of the module under test against its yardstick's."""
    (gout, ggrads), (wout, wgrads) = got, want
    bad = []
    for i, (a, b) in enumerate(zip(gout, wout)):
        name = ("output", "h_n")[i] if len(wout) == 2 else "h'"
        if a.dtype != dtype:
            bad.append(f"{name}: dtype {a.dtype}, want {dtype}")
        bad.append(mismatch(a, b, dtype, name))
    for name, w in wgrads.items():
        if w is None:
            continue
        bad.append(mismatch(ggrads.get(name), w, dtype, f"grad {name}"))
    bad = [b for b in bad if b]
    assert not bad, (what + ":\n  " if what else "") + "\n  ".join(bad)


def check_against_twin(m, args, dtype, grads_out=None, what="", prepare=None) -> None:
    """m on args (any layout) against its float64 yardstick on contiguous copies: outputs and every gradient."""
    got = forward_backward(m, args, grads_out)
    r = twin(m, prepare=prepare)
    # (without grads_out, both draw the same random grad_outputs from the same seed)
    want = forward_backward(r, tuple(to64(a) for a in args),
                            None if grads_out is None else [to64(g) for g in grads_out])
    assert_matches(got, want, dtype, what)


def rand(*shape, dtype=torch.float64, seed=None, gen=None, scale=1.0) -> Tensor:
    if gen is None:
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------
# test_modules.py over the ModuleInfo samples
# ---------------------------------------------------------------------------


class Sample:
    """One ModuleInput of common_modules.py: constructor kwargs, forward args, whether packed."""

    def __init__(self, ctor: dict, args: tuple, desc: str, packed: bool = False):
        self.ctor, self.args, self.desc, self.packed = ctor, args, desc, packed

    def __repr__(self):
        return self.desc


def _make_packed(t: Tensor, lengths) -> PackedSequence:
    req = t.requires_grad
    p = pack_padded_sequence(t.detach(), torch.tensor(lengths))
    return PackedSequence(p.data.detach().requires_grad_(req), p.batch_sizes, p.sorted_indices, p.unsorted_indices)


def gru_samples(dtype, requires_grad=False, packed=False, seed=0) -> list[Sample]:
    """module_inputs_torch_nn_RNN_GRU for nn.GRU: unbatched (3, 2) inputs, two layers, every
    bias x batch_first x bidirectional, with and without h0 (and, with packed=True, its packed samples)."""
    torch.manual_seed(seed)
    mk = functools.partial(make_tensor, device="cpu", dtype=dtype, requires_grad=requires_grad)
    out = []
    for bias, bf, bidir in product((False, True), repeat=3):
        base = dict(input_size=2, num_layers=2, batch_first=bf, bias=bias, bidirectional=bidir)
        tag = f"bias={bias},batch_first={bf},bidirectional={bidir}"
        out.append(Sample(dict(base, hidden_size=2), (mk((3, 2)),), f"{tag},no h0"))
        out.append(Sample(dict(base, hidden_size=3), (mk((3, 2)), mk((4 if bidir else 2, 3))), f"{tag},h0"))
        if packed:
            out.append(Sample(dict(base, hidden_size=2), (_make_packed(mk((5, 2, 2)), [5, 3]),),
                              f"{tag},packed [5, 3]", packed=True))
            out.append(Sample(dict(base, hidden_size=2), (_make_packed(mk((5, 5, 2)), [5, 3, 3, 2, 2]),),
                              f"{tag},packed [5, 3, 3, 2, 2]", packed=True))
    return out


def cell_samples(dtype, requires_grad=False) -> list[Sample]:
    """module_inputs_torch_nn_RNN_GRU_Cell: GRUCell(5, 10) on unbatched input (5,) and h (10,)."""
    torch.manual_seed(0)
    mk = functools.partial(make_tensor, device="cpu", dtype=dtype, requires_grad=requires_grad)
    return [Sample(dict(input_size=5, hidden_size=10), (mk(5), mk(10)), "GRUCell(5, 10)"),
            Sample(dict(input_size=5, hidden_size=10, bias=True), (mk(5), mk(10)), "GRUCell(5, 10, bias=True)")]


def no_batch_dim_reference(m, args, batch_first):
    """What an unbatched call must equal: the batched call on a batch of one, squeezed."""
    if isinstance(m, grulab.GRUCell):
        x, h = args
        return m(x.unsqueeze(0), h.unsqueeze(0)).squeeze(0)
    bdim = 0 if batch_first else 1
    x, h = (args + (None,))[:2]
    out, h_n = m(x.unsqueeze(bdim), None if h is None else h.unsqueeze(1))
    return out.squeeze(bdim), h_n.squeeze(1)


def _same(a, b, **kw):
    for x, y in zip(outputs_of(a), outputs_of(b)):
        torch.testing.assert_close(x, y, **kw)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reset_after", FORMS)
def test_forward(kernel, reset_after, dtype, training):
    """TestModule.test_forward: each sample against the no-batch-dim reference and the yardstick,
    then .float() / .double() keep every parameter in that dtype."""
    need(kernel, dtype, reset_after)
    for s in gru_samples(dtype, packed=True):
        torch.manual_seed(1)
        m = make_gru(kernel, **s.ctor, reset_after=reset_after).to(dtype)
        m.train(training)
        with torch.no_grad():
            out = m(*s.args)
        if not s.packed:
            _same(out, no_batch_dim_reference(m, s.args, s.ctor["batch_first"]))
        want = twin(m)(*(to64(a) for a in s.args))
        bad = [mismatch(a, b, dtype, f"{s}: {n}") for n, a, b in zip(("output", "h_n"), outputs_of(out),
                                                                      outputs_of(want))]
        assert not any(bad), "\n".join(b for b in bad if b)
        (m.float if dtype == torch.float32 else m.double)()
        m(*s.args)
        assert all(p.dtype == dtype and p.device.type == "cpu" for p in m.parameters()), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reset_after", FORMS)
def test_cell_forward(kernel, reset_after, dtype):
    """TestModule.test_forward on GRUCell's samples (unbatched input and h)."""
    need(kernel, dtype, reset_after)
    for s in cell_samples(dtype):
        m = make_cell(kernel, **s.ctor, reset_after=reset_after).to(dtype)
        out = m(*s.args)
        torch.testing.assert_close(out, no_batch_dim_reference(m, s.args, None))
        assert not mismatch(out, twin(m)(*(to64(a) for a in s.args)), dtype, str(s)), \
            mismatch(out, twin(m)(*(to64(a) for a in s.args)), dtype, str(s))


@pytest.mark.parametrize("dtype", DTYPES)
def test_factory_kwargs(kernel, dtype):
    """TestModule.test_factory_kwargs: device= and dtype= reach every parameter."""
    for s in gru_samples(dtype):
        m = make_gru(kernel, **s.ctor, device="cpu", dtype=dtype)
        assert all(p.dtype == dtype and p.device == torch.device("cpu") for p in m.parameters()), s
    for s in cell_samples(dtype):
        m = make_cell(kernel, **s.ctor, device="cpu", dtype=dtype)
        assert all(p.dtype == dtype and p.device == torch.device("cpu") for p in m.parameters()), s


def test_repr(kernel):
    """TestModule.test_repr, and torch's own fields first, as torch prints them."""
    for ctor in ([3, 5], [3, 5, 2], dict(input_size=3, hidden_size=5, num_layers=2, bias=False,
                                         batch_first=True, dropout=0.5, bidirectional=True)):
        args, kw = (ctor, {}) if isinstance(ctor, list) else ([], ctor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, theirs = make_gru(kernel, *args, **kw), torch.nn.GRU(*args, **kw)
        repr(ours), str(ours)
        assert ours.extra_repr().startswith(theirs.extra_repr()), (ours.extra_repr(), theirs.extra_repr())
    ours, theirs = make_cell(kernel, 3, 5, bias=False), torch.nn.GRUCell(3, 5, bias=False)
    repr(ours), str(ours)
    assert ours.extra_repr().startswith(theirs.extra_repr()), (ours.extra_repr(), theirs.extra_repr())


@pytest.mark.parametrize("reset_after", FORMS)
def test_pickle(kernel, reset_after):
    """TestModule.test_pickle: torch.save / torch.load of the whole module gives the same outputs."""
    need(kernel, torch.float32, reset_after)
    for s in gru_samples(torch.float32, packed=True) + cell_samples(torch.float32):
        make = make_gru if "num_layers" in s.ctor else make_cell
        m = make(kernel, **s.ctor, reset_after=reset_after)
        out = m(*s.args)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf, weights_only=False)
        _same(m2(*s.args), out)


@pytest.mark.parametrize("reset_after", FORMS)
def test_state_dict_round_trip(kernel, reset_after):
    """A state_dict saved with weights_only=True loads into torch.nn.GRU and back, same outputs."""
    need(kernel, torch.float64, reset_after)
    for s in gru_samples(torch.float64):
        m = make_gru(kernel, **s.ctor, reset_after=reset_after, dtype=torch.float64)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        theirs = torch.nn.GRU(**s.ctor, dtype=torch.float64)
        theirs.load_state_dict(sd)
        back = make_gru(kernel, **s.ctor, reset_after=reset_after, dtype=torch.float64)
        back.load_state_dict(theirs.state_dict())
        _same(back(*s.args), m(*s.args))
        if reset_after:
            _same(theirs(*s.args), m(*s.args), rtol=1e-9, atol=1e-10)


def _nc(t):
    """test_non_contiguous_tensors' layout: every value twice along the last dim, every other one kept."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reset_after", FORMS)
def test_non_contiguous_tensors(kernel, reset_after, dtype):
    """TestModule.test_non_contiguous_tensors: inputs and grad_outputs made non-contiguous give the
    outputs, input gradients (atol 1e-4) and parameter gradients of the contiguous ones."""
    need(kernel, dtype, reset_after)
    for s in gru_samples(dtype, requires_grad=True) + cell_samples(dtype, requires_grad=True):
        make = make_gru if "num_layers" in s.ctor else make_cell
        m = make(kernel, **s.ctor, reset_after=reset_after).to(dtype)
        g = torch.Generator().manual_seed(3)
        res = outputs_of(m(*s.args))
        gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in res]
        default = forward_backward(m, s.args, gouts)
        nc_args = tuple(_nc(a) for a in s.args)
        for args, gs in product((s.args, nc_args), (gouts, [_nc(x) for x in gouts])):
            assert any(not a.is_contiguous() for a in args) or args is s.args
            outs, grads = forward_backward(m, args, gs)
            for a, b in zip(outs, default[0]):
                torch.testing.assert_close(a, b, msg=f"{s}: outputs differ")
            for name, gr in grads.items():
                tol = dict(atol=1e-4, rtol=0) if name in ARG_NAMES else {}
                torch.testing.assert_close(gr, default[1][name], **tol, msg=lambda msg: f"{s}: grad {name}: {msg}")


def _gradients_helper(m, args, check) -> None:
    """TestModule._test_gradients_helper: the total derivative over inputs and parameters, then the
    partial derivative with one parameter at a time requiring grad."""
    params = list(m.named_parameters())

    def fn(*flat):
        a, p = flat[:len(args)], flat[len(args):]
        return tuple(outputs_of(torch.func.functional_call(m, {n: t for (n, _), t in zip(params, p)}, a)))

    flat = list(args) + [p for _, p in params]
    assert check(fn, flat)
    saved = [p.requires_grad for _, p in params]
    for _, p in params:
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
        assert check(fn, list(args) + [q for _, q in params])
        p.requires_grad_(False)
    for (_, p), r in zip(params, saved):
        p.requires_grad_(r)


# A spread of the samples (every bias / batch_first / bidirectional value, with and without h0)
# keeps the gradchecks of all kernels within the suite's time; every sample runs in test_forward.
GRAD_SAMPLES = [0, 7, 9, 14]  # indices into gru_samples(): (F,F,F,no h0), (F,T,T,h0), (T,F,F,h0), (T,T,T,no h0)


@pytest.mark.parametrize("reset_after", FORMS)
def test_grad(kernel, reset_after):
    """TestModule.test_grad: gradcheck (float64) of every output with respect to the inputs and the
    parameters, and with respect to one parameter at a time."""
    need(kernel, torch.float64, reset_after)
    samples = gru_samples(torch.float64, requires_grad=True)
    for i in GRAD_SAMPLES:
        s = samples[i]
        m = make_gru(kernel, **s.ctor, reset_after=reset_after, dtype=torch.float64)
        check = functools.partial(torch.autograd.gradcheck, fast_mode=True)
        if i == GRAD_SAMPLES[-1]:
            _gradients_helper(m, s.args, check)
        else:
            assert check(lambda *a, m=m, n=len(s.args): _call_flat(m, n, a), list(s.args) + list(m.parameters()))
    for s in cell_samples(torch.float64, requires_grad=True):
        m = make_cell(kernel, **s.ctor, reset_after=reset_after, dtype=torch.float64)
        _gradients_helper(m, s.args, functools.partial(torch.autograd.gradcheck, fast_mode=True))


def _call_flat(m, n_args, flat):
    names = [n for n, _ in m.named_parameters()]
    return tuple(outputs_of(torch.func.functional_call(m, dict(zip(names, flat[n_args:])), tuple(flat[:n_args]))))


@pytest.mark.parametrize("reset_after", FORMS)
def test_gradgrad(kernel, reset_after):
    """TestModule.test_gradgrad: gradgradcheck (float64) of the samples."""
    need(kernel, torch.float64, reset_after)
    samples = gru_samples(torch.float64, requires_grad=True)
    for i in GRAD_SAMPLES[:2]:
        s = samples[i]
        m = make_gru(kernel, **s.ctor, reset_after=reset_after, dtype=torch.float64)
        assert torch.autograd.gradgradcheck(lambda *a, m=m, n=len(s.args): _call_flat(m, n, a),
                                            list(s.args) + list(m.parameters()), fast_mode=True)
    s = cell_samples(torch.float64, requires_grad=True)[0]
    m = make_cell(kernel, **s.ctor, reset_after=reset_after, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda *a: _call_flat(m, 2, a), list(s.args) + list(m.parameters()),
                                        fast_mode=True)


@pytest.mark.parametrize("reset_after", FORMS)
def test_memory_format(kernel, reset_after):
    """TestModule.test_memory_format: module.to(memory_format=...) changes nothing; outputs and
    gradients come back contiguous."""
    need(kernel, torch.float32, reset_after)
    samples = gru_samples(torch.float32, requires_grad=True)
    for s in [samples[i] for i in GRAD_SAMPLES] + cell_samples(torch.float32, requires_grad=True):
        make = make_gru if "num_layers" in s.ctor else make_cell
        m = make(kernel, **s.ctor, reset_after=reset_after)
        want = forward_backward(m, s.args)
        for fmt in (torch.preserve_format, torch.contiguous_format):
            m.to(memory_format=fmt)
            got = forward_backward(m, s.args)
            for o in got[0]:
                assert o.is_contiguous(), f"{s}: an output is not contiguous ({fmt})"
            for n, gr in got[1].items():
                assert gr.is_contiguous(), f"{s}: grad {n} is not contiguous ({fmt})"
            for a, b in zip(got[0], want[0]):
                torch.testing.assert_close(a, b)
            for n in want[1]:
                torch.testing.assert_close(got[1][n], want[1][n])


def test_device_ctx_init(kernel):
    """TestModule.test_device_ctx_init: built under torch.device('meta'), every parameter is meta
    with the shape, dtype and strides of the CPU build."""
    for s in gru_samples(torch.float32) + cell_samples(torch.float32):
        make = make_gru if "num_layers" in s.ctor else make_cell
        cpu = make(kernel, **s.ctor)
        with torch.device("meta"):
            meta = make(kernel, **s.ctor)
        for (n, p), (_, q) in zip(meta.named_parameters(), cpu.named_parameters()):
            assert p.is_meta and p.shape == q.shape and p.dtype == q.dtype and p.stride() == q.stride(), n


@pytest.mark.parametrize("set_grad", [True, False])
@pytest.mark.parametrize("swap", [True, False])
def test_to(kernel, swap, set_grad):
    """TestModule.test_to: .to(float64) keeps Parameters (and their grads, converted), with and without
    swap_module_params_on_conversion; the converted module computes as its yardstick."""
    need(kernel, torch.float64)  # the converted module runs float64
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        for s in gru_samples(torch.float32)[:4] + cell_samples(torch.float32):
            make = make_gru if "num_layers" in s.ctor else make_cell
            m = make(kernel, **s.ctor)
            if set_grad:
                for p in m.parameters():
                    p.grad = torch.randn_like(p)
            ids = [id(p) for p in m.parameters()]
            m.to(torch.float64)
            assert [id(p) for p in m.parameters()] == ids
            for p in m.parameters():
                assert isinstance(p, nn.Parameter) and p.dtype == torch.float64
                assert (p.grad is not None and p.grad.dtype == torch.float64) if set_grad else p.grad is None
            args = tuple(a.double() for a in s.args)
            _same(m(*args), twin(m)(*args), rtol=1e-9, atol=1e-10)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def test_to_empty(kernel):
    """TestModule.test_to_empty: a meta-device module materialised with to_empty(device='cpu') has CPU
    Parameters and, re-initialised, computes as its yardstick."""
    need(kernel)
    for s in gru_samples(torch.float32)[:4] + cell_samples(torch.float32):
        make = make_gru if "num_layers" in s.ctor else make_cell
        with torch.device("meta"):
            m = make(kernel, **s.ctor)
        m.to_empty(device="cpu")
        assert all(isinstance(p, nn.Parameter) and p.device.type == "cpu" for p in m.parameters())
        m.reset_parameters()
        got, want = m(*s.args), twin(m)(*(to64(a) for a in s.args))
        bad = [mismatch(a, b, torch.float32, str(s)) for a, b in zip(outputs_of(got), outputs_of(want))]
        assert not any(bad), "\n".join(b for b in bad if b)


# -- TestModule.test_errors: module_error_inputs_torch_nn_RNN_GRU and _Cell -------------------------

GRU_CONSTRUCTION_ERRORS = [  # (args, kwargs, error type, torch's message)
    ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((3, 5), dict(bias=0), TypeError, "bias should be of type bool, got: int"),
    ((3, 5), dict(bias=1), TypeError, "bias should be of type bool, got: int"),
    ((3, 5), dict(bias="True"), TypeError, "bias should be of type bool, got: str"),
    ((3, 5), dict(bias="no"), TypeError, "bias should be of type bool, got: str"),
    ((3, 5), dict(batch_first=0), TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), dict(batch_first=1), TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), dict(batch_first="False"), TypeError, "batch_first should be of type bool, got: str"),
    ((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
    (("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
    ((0, 5), {}, ValueError, "input_size must be greater than zero"),
    ((-1, 5), {}, ValueError, "input_size must be greater than zero"),
    ((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
    ((30, 20, 2), dict(proj_size=10), ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ((3, 5, 2), dict(proj_size=2), ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ((3, 5, 2), dict(dropout=1.5), ValueError, "dropout should be a number in range [0, 1]"),
    ((3, 5, 2), dict(dropout=True), ValueError, "dropout should be a number in range [0, 1]"),
]


def _ctor_id(args, kwargs) -> str:
    return ",".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]).replace(" ", "")


@pytest.mark.parametrize("args,kwargs,exc,words", GRU_CONSTRUCTION_ERRORS,
                         ids=[_ctor_id(a, k) for a, k, _, _ in GRU_CONSTRUCTION_ERRORS])
def test_construction_errors(kernel, args, kwargs, exc, words):
    """TestModule.test_errors (construction) and test_projections_errors_on_gru_and_rnn: torch's error
    type and message."""
    with pytest.raises(exc) as theirs:
        torch.nn.GRU(*args, **kwargs)
    assert words in str(theirs.value)  # the contract is torch's
    with pytest.raises(exc) as ours:
        make_gru(kernel, *args, **kwargs)
    assert words in str(ours.value), str(ours.value)


def _gru_forward_errors(dtype):
    other = torch.float64 if dtype == torch.float32 else torch.float32
    return [  # (module args, module kwargs, forward args, error type, regex)
        ((3, 5), {}, (torch.randn(2, 4, 3, dtype=other),), ValueError,
         r"(RNN|GRU) input dtype .* does not match weight dtype .* Convert input: input\.to\(.*\), "
         r"or convert model: model\.to\(.*\)"),
        # test_cudnn_forward_exception
        ((10, 20), dict(batch_first=True), (torch.randn(2, 3, 10, dtype=dtype), torch.zeros(1, 2, 19, dtype=dtype)),
         RuntimeError, r"Expected hidden.*size.*got"),
        ((10, 20), dict(batch_first=True), (torch.randn(2, 3, 3, dtype=dtype),), RuntimeError,
         r"input\.size\(-1\) must be equal to input_size"),
        ((3, 5), {}, (torch.randn(2, 2, 2, 3, dtype=dtype),), ValueError, r"Expected input to be 2D or 3D, got 4D"),
        ((3, 5), {}, (torch.randn(4, 3, dtype=dtype), torch.randn(1, 1, 5, dtype=dtype)), RuntimeError,
         r"For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
        ((3, 5), {}, (torch.randn(4, 2, 3, dtype=dtype), torch.randn(1, 5, dtype=dtype)), RuntimeError,
         r"For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_errors(kernel, dtype):
    """TestModule.test_errors (forward) and test_cudnn_forward_exception, which runs on the CPU too."""
    for margs, mkw, fargs, exc, regex in _gru_forward_errors(dtype):
        theirs = torch.nn.GRU(*margs, **mkw, dtype=dtype)
        with pytest.raises(exc, match=regex):
            plain(theirs)(*fargs)
        ours = make_gru(kernel, *margs, **mkw, dtype=dtype)
        with pytest.raises(exc, match=regex):
            ours(*fargs)


def test_rnn_args_check(kernel):
    """test_rnn_args_check: a wrong input batch, hidden batch, input size, hidden size or
    hidden[0] raises RuntimeError."""
    I, H, L, B, T, bad = 3, 5, 2, 4, 6, 7
    cases = [((T, bad, I), (L, B, H)), ((T, B, I), (L, bad, H)), ((T, B, bad), (L, B, H)),
             ((T, B, I), (L, B, bad)), ((T, B, I), (bad, B, H))]
    for xs, hs in cases:
        x, h = torch.randn(xs), torch.randn(hs)
        with pytest.raises(RuntimeError):
            torch.nn.GRU(I, H, L)(x, h)
        with pytest.raises(RuntimeError):
            make_gru(kernel, I, H, L)(x, h)


CELL_FORWARD_ERRORS = [  # (module args, x shape, h shape, error type, message)
    ((10, 20), (3, 11), (3, 20), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
    ((10, 20), (3, 10), (3, 21), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ((10, 20), (3, 10), (5, 20), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
    ((10, 20), (3, 10), (3, 1, 1, 20), ValueError, "Expected hidden to be 1D or 2D, got 4D instead"),
    ((10, 20, "relu"), (3, 10), (3, 21), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ((10, 20, "tanh"), (3, 10), (3, 21), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ((10, 20), (2, 3, 10), None, ValueError, "Expected input to be 1D or 2D, got 3D instead"),
    # test_RNN_cell_no_broadcasting: no broadcasting of the batch, the hidden size or the input size
    ((10, 20), (3, 10), (1, 20), RuntimeError, None),
    ((10, 20), (3, 10), (3, 1), RuntimeError, None),
    ((10, 20), (3, 1), (3, 20), RuntimeError, None),
]


@pytest.mark.parametrize("margs,xs,hs,exc,words", CELL_FORWARD_ERRORS,
                         ids=[f"{_ctor_id(m, {})}-x{x}-h{h}".replace(" ", "") for m, x, h, _, _ in CELL_FORWARD_ERRORS])
def test_cell_errors(kernel, margs, xs, hs, exc, words):
    """TestModule.test_errors for GRUCell and test_RNN_cell_no_broadcasting."""
    x, h = torch.randn(xs), None if hs is None else torch.randn(hs)
    with pytest.raises(exc) as theirs:
        torch.nn.GRUCell(*margs)(x, h)
    with pytest.raises(exc) as ours:
        make_cell(kernel, *margs)(x, h)
    if words:
        assert words in str(theirs.value)
        assert words in str(ours.value), str(ours.value)


@pytest.mark.parametrize("reset_after", FORMS)
def test_cell_dtype_mismatch_raises_runtime_error(kernel, reset_after):
    """torch.nn.GRUCell on a float64 input with float32 weights (or h) raises RuntimeError."""
    need(kernel, torch.float32, reset_after)
    for x, h in ((torch.randn(2, 3, dtype=torch.float64), None),
                 (torch.randn(2, 3), torch.randn(2, 5, dtype=torch.float64))):
        with pytest.raises(RuntimeError):
            torch.nn.GRUCell(3, 5)(x, h)
        with pytest.raises(RuntimeError):
            make_cell(kernel, 3, 5, reset_after=reset_after)(x, h)


def test_gru_hidden_dtype_mismatch_raises_runtime_error(kernel):
    """torch.nn.GRU with an h0 of another dtype than the input raises RuntimeError."""
    x, h = torch.randn(4, 2, 3), torch.randn(1, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        torch.nn.GRU(3, 5)(x, h)
    with pytest.raises(RuntimeError):
        make_gru(kernel, 3, 5)(x, h)


# ---------------------------------------------------------------------------
# test_nn.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", FORMS)
def test_RNN_cell(kernel, reset_after, bias):
    """test_RNN_cell: six steps of GRUCell(10, 20) fed its own state, then backward; here also
    against the yardstick."""
    need(kernel, torch.float64, reset_after)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 20, generator=g, dtype=torch.float64, requires_grad=True)
    m = make_cell(kernel, 10, 20, bias=bias, reset_after=reset_after, dtype=torch.float64)

    class Six(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x, h):
            for _ in range(6):
                h = self.cell(x, h)
            return h

    got = forward_backward(Six(m), (x, h0))
    want = forward_backward(Six(twin(m)), (to64(x), to64(h0)))
    assert_matches(got, want, torch.float64)


@pytest.mark.parametrize("reset_after", FORMS)
def test_rnn_initial_hidden_state(kernel, reset_after):
    """test_rnn_initial_hidden_state: h0 = zeros gives what no h0 gives."""
    need(kernel, torch.float32, reset_after)
    m = make_gru(kernel, 30, 20, 2, reset_after=reset_after)
    x = torch.randn(10, 32, 30)
    o1, h1 = m(x, torch.zeros(2, 32, 20))
    o2, h2 = m(x)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("reset_after", FORMS)
def test_error_RNN_seq_len_zero(kernel, reset_after):
    """test_error_RNN_seq_len_zero: an empty sequence (T = 0) raises RuntimeError, as torch.nn.GRU's
    "Expected sequence length to be larger than 0 in RNN"."""
    need(kernel, torch.float32, reset_after)
    for bidirectional, batch_first in product((True, False), repeat=2):
        x = torch.ones(10, 0, 5) if batch_first else torch.ones(0, 10, 5)
        for inp in (x, torch.ones(0, 5)):
            theirs = torch.nn.GRU(5, 6, bidirectional=bidirectional, batch_first=batch_first)
            with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
                theirs(inp)
            ours = make_gru(kernel, 5, 6, bidirectional=bidirectional, batch_first=batch_first,
                            reset_after=reset_after)
            with pytest.raises(RuntimeError):
                ours(inp)


@pytest.mark.parametrize("reset_after", FORMS)
def test_RNN_dropout_state(kernel, reset_after):
    """test_RNN_dropout_state (CPU arm): with dropout between layers in training two calls differ,
    else they are equal; a pickled copy behaves the same."""
    need(kernel, torch.float32, reset_after)
    for p, train in product((0, 0.1234), (True, False)):
        m = make_gru(kernel, 40, 40, 2, bias=False, dropout=p, reset_after=reset_after)
        m.train(train)
        x, h = torch.rand(1, 1, 40), torch.rand(2, 1, 40)
        o1, h1 = m(x, h)
        o2, h2 = m(x, h)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf, weights_only=False)
        m2.flatten_parameters()
        o3, h3 = m2(x, h)
        if p == 0 or not train:
            for a, b in ((o1, o2), (o1, o3), (h1, h2), (h1, h3)):
                torch.testing.assert_close(a, b)
        else:
            for a, b in ((o1, o2), (o1, o3), (h1, h2), (h1, h3)):
                assert not torch.equal(a, b)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("reset_after", FORMS)
def test_RNN_change_dropout(kernel, reset_after, train):
    """test_RNN_change_dropout (CPU arm): changing .dropout between calls takes effect."""
    need(kernel, torch.float64, reset_after)
    m = make_gru(kernel, 20, 20, 2, dropout=0, reset_after=reset_after, dtype=torch.float64)
    m.train(train)
    x = torch.rand(3, 2, 20, dtype=torch.float64)
    prev = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        m.dropout = p
        o1, h1 = m(x)
        o2, h2 = m(x)
        if p == 0 or p == 1 or not train:
            torch.testing.assert_close(o1, o2)
            torch.testing.assert_close(h1, h2)
        else:
            assert not torch.equal(o1, o2) and not torch.equal(h1, h2), f"dropout={p}"
        if prev is not None:
            if not train:
                torch.testing.assert_close(o1, prev)
                torch.testing.assert_close(o2, prev)
            else:
                assert not torch.equal(o1, prev) and not torch.equal(o2, prev), f"dropout={p}"
        prev = o1.detach()


def _make_noncontig(t: Tensor) -> Tensor:
    """_test_RNN_cpu_vs_cudnn's layout: the values interleaved with zeros along a new last dim."""
    n = t.dim()
    return torch.stack([t.clone().zero_(), t], n).select(n, 1)


# _test_RNN_cpu_vs_cudnn loops over every (bias, bidirectional, batch_first, contig, variable_len,
# lens_as_tensor); these eight rows cover every pair of values of any two of them (an L8 array).
OPTION_ROWS = [(0, 0, 0, 0, 0, 0), (0, 0, 0, 1, 1, 1), (0, 1, 1, 0, 0, 1), (0, 1, 1, 1, 1, 0),
               (1, 0, 1, 0, 1, 0), (1, 0, 1, 1, 0, 1), (1, 1, 0, 0, 1, 1), (1, 1, 0, 1, 0, 0)]


@pytest.mark.parametrize("dropout", [0, 1])
@pytest.mark.parametrize("reset_after", FORMS)
def test_options_against_torch(kernel, reset_after, dropout):
    """_test_RNN_cpu_vs_cudnn (no dropout / dropout 1), on the CPU: grulab.GRU against its float64
    yardstick for bias, bidirectional, batch_first, non-contiguous input, h0 and grad_outputs,
    variable lengths (packed, lengths as a list or a tensor); output, h_n and every gradient."""
    need(kernel, torch.float64, reset_after)
    I, H, L, T, B = 10, 6, 2, 7, 6
    for row in (OPTION_ROWS if dropout == 0 else OPTION_ROWS[1::3]):
        bias, bidir, bf, contig, var_len, lens_tensor = map(bool, row)
        D = 2 if bidir else 1
        g = torch.Generator().manual_seed(sum(r << i for i, r in enumerate(row)))
        r = functools.partial(torch.randn, generator=g, dtype=torch.float64)
        x = r(B, T, I) if bf else r(T, B, I)
        gout = r(B, T, H * D) if bf else r(T, B, H * D)
        hx, gh = r(L * D, B, H), r(L * D, B, H)
        if not contig:
            x, gout, hx, gh = map(_make_noncontig, (x, gout, hx, gh))
        if var_len:
            lengths = [7, 5, 5, 2, 1, 1]
            lengths = torch.tensor(lengths) if lens_tensor else lengths
            packed = pack_padded_sequence(x, lengths, batch_first=bf)
            inp = PackedSequence(leaf(packed.data), packed.batch_sizes)
            gout = pack_padded_sequence(gout, lengths, batch_first=bf).data
        else:
            inp = leaf(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = make_gru(kernel, I, H, L, bias=bias, dropout=dropout, bidirectional=bidir, batch_first=bf,
                         reset_after=reset_after, dtype=torch.float64)
        check_against_twin(m, (inp, leaf(hx)), torch.float64, [gout, gh],
                           what=f"bias={bias} bidirectional={bidir} batch_first={bf} contig={contig} "
                                f"variable_len={var_len} lens_as_tensor={lens_tensor} dropout={dropout}")


@pytest.mark.parametrize("reset_after", FORMS)
def test_weight_tying(kernel, reset_after):
    """test_cudnn_weight_tying (its CPU part): one Parameter under two names (bias_ih_l0_reverse is
    bias_ih_l0) gets the sum of both gradients; an SGD step and a second forward agree too."""
    need(kernel, torch.float32, reset_after)
    m = make_gru(kernel, 10, 20, batch_first=True, bidirectional=True, reset_after=reset_after)
    m.bias_ih_l0_reverse = m.bias_ih_l0
    r = twin(m)
    r.bias_ih_l0_reverse = r.bias_ih_l0
    x, hx = torch.randn(5, 4, 10), torch.randn(2, 5, 20)
    outs = []
    for mod, dt in ((m, torch.float32), (r, torch.float64)):
        xi, hi = x.detach().to(dt).requires_grad_(), hx.detach().to(dt).requires_grad_()
        opt = torch.optim.SGD(mod.parameters(), lr=0.1)
        opt.zero_grad()
        mod(xi, hi)[0].sum().backward()
        grads = {n: p.grad.clone() for n, p in mod.named_parameters()}
        opt.step()
        outs.append((mod(xi, hi)[0].detach(), grads, xi.grad, hi.grad))
    bad = [mismatch(outs[0][0], outs[1][0], torch.float32, "output after a step"),
           mismatch(outs[0][2], outs[1][2], torch.float32, "grad x"),
           mismatch(outs[0][3], outs[1][3], torch.float32, "grad h0")]
    bad += [mismatch(outs[0][1][n], w, torch.float32, f"grad {n}") for n, w in outs[1][1].items()]
    assert not any(bad), "\n".join(b for b in bad if b)


@pytest.mark.parametrize("reset_after", FORMS)
def test_partial_flat_weights(kernel, reset_after):
    """test_partial_flat_weights (its CPU part): deleting a weight attribute and setting it back
    leaves a module that computes as before."""
    need(kernel, torch.float32, reset_after)
    m = make_gru(kernel, 10, 6, 2, reset_after=reset_after)
    inp = torch.randn(3, 2, 10)
    want = m(inp)
    w = m.weight_hh_l0
    del m.weight_hh_l0
    assert not hasattr(m, "weight_hh_l0")
    m.weight_hh_l0 = w
    _same(m(inp), want)


@pytest.mark.parametrize("reset_after", FORMS)
def test_rnn_weight_norm(kernel, reset_after):
    """test_rnn_weight_norm (LSTM there): weight_norm on one weight turns it into a computed tensor
    (one Parameter fewer among _flat_weights); outputs and gradients equal the yardstick's with the same
    reparametrisation; remove_weight_norm restores the Parameter. And the parametrizations API."""
    need(kernel, torch.float64, reset_after)
    x = torch.randn(7, 3, 8, dtype=torch.float64)
    for name in ("weight_ih_l0", "weight_hh_l0"):
        m = make_gru(kernel, 8, 8, reset_after=reset_after, dtype=torch.float64)
        before = m(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = torch.nn.utils.weight_norm(m, name=name)
            assert sum(isinstance(p, nn.Parameter) for p in m._flat_weights) == 3
            _same(m(x), before, rtol=1e-9, atol=1e-10)
            check_against_twin(m, (leaf(x),), torch.float64, what=f"weight_norm({name})",
                               prepare=lambda r: torch.nn.utils.weight_norm(r, name=name))
            m = torch.nn.utils.remove_weight_norm(m, name=name)
        assert sum(isinstance(p, nn.Parameter) for p in m._flat_weights) == 4
        assert name in m._parameters and m._parameters[name] is not None
        assert name + "_v" not in m._parameters and name + "_g" not in m._parameters
        params = dict(m.named_parameters())
        assert name in params and name + "_v" not in params and name + "_g" not in params
        _same(m(x), before, rtol=1e-9, atol=1e-10)
        # torch.nn.utils.parametrizations.weight_norm
        wn = torch.nn.utils.parametrizations.weight_norm
        m = wn(make_gru(kernel, 8, 8, reset_after=reset_after, dtype=torch.float64), name=name)
        check_against_twin(m, (leaf(x),), torch.float64, what=f"parametrizations.weight_norm({name})",
                           prepare=lambda r: wn(r, name=name))


@pytest.mark.parametrize("reset_after", FORMS)
def test_rnn_retain_variables(kernel, reset_after):
    """test_rnn_retain_variables: backward through a retained graph five times gives the same
    gradients each time."""
    need(kernel, torch.float64, reset_after)
    m = make_gru(kernel, 10, 20, num_layers=2, reset_after=reset_after, dtype=torch.float64)
    x = torch.randn(5, 6, 10, dtype=torch.float64, requires_grad=True)
    out = m(x)
    out[0].sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    for _ in range(4):
        m.zero_grad()
        x.grad.zero_()
        out[0].sum().backward(retain_graph=True)
        for a, b in zip(grads, [x.grad] + [p.grad for p in m.parameters()]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", FORMS)
def test_GRU_grad_and_gradgrad(kernel, reset_after, bias):
    """test_GRU_grad_and_gradgrad: gradcheck and gradgradcheck (float64, full mode) of GRU(4, 4)'s
    outputs with respect to its input."""
    need(kernel, torch.float64, reset_after)
    inp = torch.rand(1, 3, 4, dtype=torch.float64, requires_grad=True)
    m = make_gru(kernel, 4, 4, bias=bias, reset_after=reset_after, dtype=torch.float64)

    def fn(x):
        return tuple(outputs_of(m(x)))

    assert torch.autograd.gradcheck(fn, (inp,), check_batched_grad=False)
    assert torch.autograd.gradgradcheck(fn, (inp,), check_batched_grad=False)


@pytest.mark.parametrize("reset_after", FORMS)
def test_variable_sequence(kernel, reset_after):
    """test_variable_sequence (LSTM there): a packed batch of sequences of different lengths gives,
    per sequence, the output, h_n and input gradient of that sequence run alone; the parameter
    gradients are their sums."""
    need(kernel, torch.float64, reset_after)
    m = make_gru(kernel, 3, 4, num_layers=2, bidirectional=True, reset_after=reset_after, dtype=torch.float64)
    lengths = [10, 10, 6, 2, 2, 1, 1]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in lengths]
    gouts = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in lengths]
    ghs = [torch.randn(4, 8 // 2, generator=g, dtype=torch.float64) for n in lengths]

    # alone, unbatched
    want_out, want_h, want_gx = [], [], []
    m.zero_grad()
    for s, go, gh in zip(seqs, gouts, ghs):
        x = s.clone().requires_grad_()
        out, h = m(x)
        torch.autograd.backward([out, h], [go, gh])
        want_out.append(out.detach())
        want_h.append(h.detach())
        want_gx.append(x.grad)
    want_p = {n: p.grad.clone() for n, p in m.named_parameters()}

    # together, packed (unsorted)
    m.zero_grad()
    order = [3, 0, 5, 1, 6, 2, 4]
    packed = pack_sequence([seqs[i] for i in order], enforce_sorted=False)
    data = leaf(packed.data)
    out, h = m(PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices))
    gpacked = pack_sequence([gouts[i] for i in order], enforce_sorted=False).data
    torch.autograd.backward([out.data, h], [gpacked, torch.stack([ghs[i] for i in order], 1)])
    padded, lens = pad_packed_sequence(out)
    gx_padded, _ = pad_packed_sequence(PackedSequence(data.grad, packed.batch_sizes, packed.sorted_indices,
                                                      packed.unsorted_indices))
    for k, i in enumerate(order):
        n = lengths[i]
        assert int(lens[k]) == n
        torch.testing.assert_close(padded[:n, k], want_out[i], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(padded[n:, k], torch.zeros_like(padded[n:, k]))
        torch.testing.assert_close(h[:, k], want_h[i], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gx_padded[:n, k], want_gx[i], rtol=1e-9, atol=1e-10)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want_p[n], rtol=1e-9, atol=1e-10, msg=lambda s: f"grad {n}: {s}")


# ---------------------------------------------------------------------------
# Issue 21: every argument in any strided layout
# ---------------------------------------------------------------------------


def strided(values: Tensor, how: str) -> Tensor:
    """A tensor equal to ``values`` laid out as ``how``; the memory it skips holds NaN, so a kernel
    that reads a wrong element shows it.

    sliced: a slice of a wider last dim; step2: every other element of the last dim; transposed:
    the first two dims swapped in memory; outer: the last dim outermost in memory; time_strided:
    every other row of the first dim."""
    shape = tuple(values.shape)
    if how == "contiguous":
        return values.contiguous()
    if how == "sliced":
        big = torch.full(shape[:-1] + (shape[-1] + 5,), float("nan"), dtype=values.dtype)
        big[..., : shape[-1]] = values
        return big[..., : shape[-1]]
    if how == "step2":
        big = torch.full(shape[:-1] + (2 * shape[-1],), float("nan"), dtype=values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if how == "transposed":
        if values.dim() < 2:
            return strided(values, "step2")
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "outer":
        perm = [values.dim() - 1] + list(range(values.dim() - 1))
        inv = [perm.index(i) for i in range(values.dim())]
        return values.permute(perm).contiguous().permute(inv)
    if how == "time_strided":
        big = torch.full((2 * shape[0],) + shape[1:], float("nan"), dtype=values.dtype)
        big[::2] = values
        return big[::2]
    raise ValueError(how)


def set_weight_layout(m: nn.Module, how: str) -> None:
    """Every parameter of m replaced by a Parameter holding the same values in layout ``how``."""
    for name, p in list(m.named_parameters()):
        view = strided(p.detach(), how if p.dim() == 2 else ("step2" if how != "contiguous" else how))
        setattr(m, name, nn.Parameter(view))


# (name, x layout, h0 layout, weight layout, grad_output layout)
LAYOUTS = [
    ("contiguous", "contiguous", "contiguous", "contiguous", "contiguous"),
    ("x_sliced", "sliced", "contiguous", "contiguous", "contiguous"),
    ("x_step2", "step2", "contiguous", "contiguous", "contiguous"),
    ("x_transposed", "transposed", "contiguous", "contiguous", "contiguous"),
    ("x_features_outer", "outer", "contiguous", "contiguous", "contiguous"),
    ("x_expanded_batch", "expand_batch", "contiguous", "contiguous", "contiguous"),
    ("x_expanded_time", "expand_time", "contiguous", "contiguous", "contiguous"),
    ("x_time_strided", "time_strided", "contiguous", "contiguous", "contiguous"),
    ("h0_sliced", "contiguous", "sliced", "contiguous", "contiguous"),
    ("h0_transposed", "contiguous", "transposed", "contiguous", "contiguous"),
    ("h0_expanded", "contiguous", "expand_batch", "contiguous", "contiguous"),
    ("weights_transposed", "contiguous", "contiguous", "transposed", "contiguous"),
    ("weights_sliced", "contiguous", "contiguous", "sliced", "contiguous"),
    ("grad_out_step2", "contiguous", "contiguous", "contiguous", "step2"),
    ("grad_out_expanded", "contiguous", "contiguous", "contiguous", "expand_all"),
    ("grad_out_transposed", "contiguous", "contiguous", "contiguous", "transposed"),
    ("everything", "sliced", "transposed", "transposed", "step2"),
]

SHAPES = {  # (T, B, I, H, layers, bidirectional)
    "small": (5, 3, 6, 7, 1, False),
    "wide": (7, 17, 28, 64, 1, False),  # the I = 28; B and H large enough for the SIMD packed paths
    "deep": (4, 5, 6, 8, 2, True),
}


def layout_tensor(shape, how, gen, dtype, scale=1.0) -> Tensor:
    """Random values of ``shape`` in layout ``how`` (expand_*: stride 0 along the batch / time / all)."""
    if how == "expand_batch":
        small = list(shape)
        small[-2] = 1
        return (torch.randn(small, generator=gen, dtype=torch.float64) * scale).to(dtype).expand(shape)
    if how == "expand_time":
        small = list(shape)
        small[0] = 1
        return (torch.randn(small, generator=gen, dtype=torch.float64) * scale).to(dtype).expand(shape)
    if how == "expand_all":
        return torch.randn((), generator=gen, dtype=torch.float64).to(dtype).expand(shape)
    return strided((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype), how)


def layer_case(shape_name, layout, dtype, reset_after, target, batch_first=False, seed=0):
    T, B, I, H, L, bidir = SHAPES[shape_name]
    D = 2 if bidir else 1
    _, xl, hl, wl, gl = next(c for c in LAYOUTS if c[0] == layout)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = make_gru(target, I, H, L, bidirectional=bidir, batch_first=batch_first, reset_after=reset_after, dtype=dtype)
    set_weight_layout(m, wl)
    xshape = (B, T, I) if batch_first else (T, B, I)
    x = leaf(layout_tensor(xshape, xl if not batch_first else "contiguous", g, dtype))
    h0 = leaf(layout_tensor((L * D, B, H), hl, g, dtype, 0.5))
    oshape = (B, T, D * H) if batch_first else (T, B, D * H)
    gout = layout_tensor(oshape, gl, g, dtype)
    gh = layout_tensor((L * D, B, H), gl, g, dtype)
    return m, (x, h0), [gout, gh]


def _layout_params():
    """Every layout on the small shape in float32; the input's layouts, the contiguous baseline and
    "everything" in float64 too; the input's, the baseline and "everything" on the wide shape."""
    f32, f64 = torch.float32, torch.float64
    x_layouts = [c[0] for c in LAYOUTS if c[0].startswith("x_")]
    out = [(name, "small", f32) for name, *_ in LAYOUTS]
    out += [(name, "small", f64) for name in ["contiguous", *x_layouts, "everything"]]
    out += [(name, "wide", f32) for name in ["contiguous", "x_sliced", "x_step2", "x_features_outer",
                                             "x_expanded_batch", "x_time_strided", "everything"]]
    out += [(name, "wide", f64) for name in ["contiguous", "x_sliced", "everything"]]
    return out


@pytest.mark.parametrize("reset_after", FORMS)
@pytest.mark.parametrize("layout,shape,dtype", _layout_params(),
                         ids=[f"{n}-{s}-{str(d)[6:]}" for n, s, d in _layout_params()])
def test_layouts(kernel, layout, shape, reset_after, dtype):
    """Each argument of GRU.forward and its backward in a strided layout (x sliced in its last dim as
    in the issue, every other feature, transposed, features outermost, expanded with stride 0 along
    the batch or time, every other time step; h0 sliced, transposed, expanded; every weight and bias a
    non-contiguous view; grad_output strided, expanded as out.sum()'s is, transposed): output, h_n and
    every gradient equal the yardstick's on contiguous copies."""
    need(kernel, dtype, reset_after)
    m, args, gouts = layer_case(shape, layout, dtype, reset_after, kernel)
    check_against_twin(m, args, dtype, gouts, what=f"layout {layout}, shape {SHAPES[shape]}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reset_after", FORMS)
def test_layouts_deep_and_batch_first(kernel, reset_after, dtype):
    """Two layers, bidirectional, every argument strided; and batch_first with contiguous (B, T, I)
    input, which the module sees time-major as a transposed view."""
    need(kernel, dtype, reset_after)
    m, args, gouts = layer_case("deep", "everything", dtype, reset_after, kernel)
    check_against_twin(m, args, dtype, gouts, what="deep, every argument strided")
    for shape in ("small", "wide"):
        m, args, gouts = layer_case(shape, "contiguous", dtype, reset_after, kernel, batch_first=True)
        check_against_twin(m, args, dtype, gouts, what=f"batch_first, shape {SHAPES[shape]}")


CELL_LAYOUTS = [  # (name, x layout, h layout, weight layout, grad layout)
    ("contiguous", "contiguous", "contiguous", "contiguous", "contiguous"),
    ("x_sliced", "sliced", "contiguous", "contiguous", "contiguous"),
    ("x_transposed", "transposed", "contiguous", "contiguous", "contiguous"),
    ("x_expanded", "expand_batch", "contiguous", "contiguous", "contiguous"),
    ("h_step2", "contiguous", "step2", "contiguous", "contiguous"),
    ("h_transposed", "contiguous", "transposed", "contiguous", "contiguous"),
    ("h_expanded", "contiguous", "expand_batch", "contiguous", "contiguous"),
    ("weights_transposed", "contiguous", "contiguous", "transposed", "contiguous"),
    ("grad_step2", "contiguous", "contiguous", "contiguous", "step2"),
    ("grad_expanded", "contiguous", "contiguous", "contiguous", "expand_all"),
    ("everything", "sliced", "transposed", "sliced", "step2"),
]


CELL_LAYOUT_PARAMS = [(c[0], torch.float32) for c in CELL_LAYOUTS] + [
    (name, torch.float64) for name in ("contiguous", "x_sliced", "x_transposed", "h_transposed", "everything")]


@pytest.mark.parametrize("reset_after", FORMS)
@pytest.mark.parametrize("layout,dtype", CELL_LAYOUT_PARAMS, ids=[f"{n}-{str(d)[6:]}" for n, d in CELL_LAYOUT_PARAMS])
def test_cell_layouts(kernel, layout, reset_after, dtype):
    """GRUCell's x, h, weights and grad_output in strided layouts, in training (with grad) and
    generation (no_grad); against the yardstick."""
    need(kernel, dtype, reset_after)
    _, xl, hl, wl, gl = next(c for c in CELL_LAYOUTS if c[0] == layout)
    for B, I, H in ((3, 6, 7), (17, 28, 64)):
        g = torch.Generator().manual_seed(B)
        m = make_cell(kernel, I, H, reset_after=reset_after, dtype=dtype)
        set_weight_layout(m, wl)
        x = leaf(layout_tensor((B, I), xl, g, dtype))
        h = leaf(layout_tensor((B, H), hl, g, dtype, 0.5))
        gout = layout_tensor((B, H), gl, g, dtype)
        check_against_twin(m, (x, h), dtype, [gout], what=f"layout {layout}, (B, I, H) = {(B, I, H)}")
        with torch.no_grad():
            got = m(x, h)
        want = twin(m)(to64(x).detach(), to64(h).detach())
        assert not mismatch(got, want, dtype, "no_grad"), mismatch(got, want, dtype, "no_grad")


PACKED_CASES = [  # (layers, bidirectional, enforce_sorted, given h0, data layout)
    (1, False, True, False, "contiguous"),
    (1, False, False, True, "step2"),
    (2, True, False, False, "contiguous"),
    (2, True, True, True, "step2"),
    (2, False, False, True, "sliced"),
    (1, True, False, True, "contiguous"),
]


PACKED_PARAMS = [(c, torch.float32) for c in PACKED_CASES] + [(c, torch.float64) for c in PACKED_CASES[2:4]]


@pytest.mark.parametrize("reset_after", FORMS)
@pytest.mark.parametrize("case,dtype", PACKED_PARAMS, ids=[f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'sorted' if c[2] else 'unsorted'}-"
                              f"{'h0' if c[3] else 'no_h0'}-{c[4]}-{str(d)[6:]}" for c, d in PACKED_PARAMS])
def test_packed_sequence(kernel, case, reset_after, dtype):
    """A PackedSequence (sorted or not, its data contiguous or strided) with and without h0: the packed
    output, h_n (in the caller's order) and the gradients of the data, h0 and every parameter."""
    need(kernel, dtype, reset_after)
    L, bidir, enforce_sorted, given_h0, data_layout = case
    I, H, D = 5, 6, 2 if bidir else 1
    lengths = [6, 5, 5, 3, 2, 1, 1] if enforce_sorted else [3, 6, 1, 5, 2, 5, 1]
    g = torch.Generator().manual_seed(L)
    seqs = [torch.randn(n, I, generator=g, dtype=torch.float64).to(dtype) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    data = leaf(strided(packed.data, data_layout))
    inp = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    m = make_gru(kernel, I, H, L, bidirectional=bidir, reset_after=reset_after, dtype=dtype)
    args = (inp,) + ((leaf(rand(L * D, len(lengths), H, dtype=dtype, gen=g)),) if given_h0 else ())
    check_against_twin(m, args, dtype, what=f"packed {case}")


# ---------------------------------------------------------------------------
# Issue 21: zero sizes (in a child process: a kernel may die on them)
# ---------------------------------------------------------------------------


def _assert_zero_grads(named: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        gr = named.get(name)
        assert gr is not None, f"grad {name}: None, torch gives zeros of shape {shape}"
        assert tuple(gr.shape) == tuple(shape), f"grad {name}: shape {tuple(gr.shape)}, want {shape}"
        assert not bool(gr.any()), f"grad {name}: not all zero"


def _zero_batch_gru(target, reset_after, L=1, bidir=False, batch_first=False, given_h0=False):
    """test_RNN_input_size_zero: B = 0 gives empty outputs of the right shapes, and a backward that
    gives zero gradients of the right shapes, as torch.nn.GRU."""
    D = 2 if bidir else 1
    m = make_gru(target, 3, 4, L, bidirectional=bidir, batch_first=batch_first, reset_after=reset_after)
    x = torch.zeros((0, 5, 3) if batch_first else (5, 0, 3), requires_grad=True)
    h0 = torch.zeros(L * D, 0, 4, requires_grad=True) if given_h0 else None
    out, h_n = m(x, h0)
    assert tuple(out.shape) == ((0, 5, 4 * D) if batch_first else (5, 0, 4 * D)), tuple(out.shape)
    assert tuple(h_n.shape) == (L * D, 0, 4), tuple(h_n.shape)
    (out.sum() + h_n.sum()).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}
    shapes = {"x": tuple(x.shape), **{n: tuple(p.shape) for n, p in m.named_parameters()}}
    if given_h0:
        grads["h0"], shapes["h0"] = h0.grad, tuple(h0.shape)
    _assert_zero_grads(grads, shapes)
    with torch.no_grad():
        out2, h2 = m(x, h0)
    assert out2.shape == out.shape and h2.shape == h_n.shape


def _zero_batch_cell(target, reset_after):
    m = make_cell(target, 4, 5, reset_after=reset_after)
    x, h = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 5, requires_grad=True)
    y = m(x, h)
    assert tuple(y.shape) == (0, 5), tuple(y.shape)
    y.sum().backward()
    _assert_zero_grads({"x": x.grad, "h": h.grad, **{n: p.grad for n, p in m.named_parameters()}},
                       {"x": (0, 4), "h": (0, 5), **{n: tuple(p.shape) for n, p in m.named_parameters()}})
    with torch.no_grad():
        assert tuple(m(x.detach()).shape) == (0, 5)


def _zero_hidden_cell(target, reset_after):
    """test_RNN_cell_forward_zero_hidden_size: GRUCell(10, 0) is accepted and gives (3, 0); its
    backward gives zero gradients of the right shapes, as torch.nn.GRUCell."""
    m = make_cell(target, 10, 0, reset_after=reset_after)
    x, h = torch.randn(3, 10, requires_grad=True), torch.randn(3, 0, requires_grad=True)
    y = m(x, h)
    assert tuple(y.shape) == (3, 0), tuple(y.shape)
    y.sum().backward()
    _assert_zero_grads({"x": x.grad, "h": h.grad, **{n: p.grad for n, p in m.named_parameters()}},
                       {"x": (3, 10), "h": (3, 0), **{n: tuple(p.shape) for n, p in m.named_parameters()}})
    with torch.no_grad():
        assert tuple(m(x.detach()).shape) == (3, 0)


def _zero_input_cell(target, reset_after):
    """GRUCell(0, 5), which torch accepts: the state evolves from h alone, as in torch."""
    m = make_cell(target, 0, 5, reset_after=reset_after, dtype=torch.float64)
    x = torch.zeros(3, 0, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = m(x, h)
    p = dict(m.named_parameters())
    want = reference.gru_step(x, h, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"],
                              reset_after).h
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)
    wrt = [h, p["weight_hh"], p["weight_ih"], p["bias_ih"], p["bias_hh"]]
    got = torch.autograd.grad(y.sum(), wrt, allow_unused=True)
    exp = torch.autograd.grad(want.sum(), wrt, allow_unused=True)
    for t, a, b in zip(wrt, got, exp):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


ZERO_CASES: dict[str, Callable] = {
    "gru_batch0": _zero_batch_gru,
    "gru_batch0_h0": functools.partial(_zero_batch_gru, given_h0=True),
    "gru_batch0_2layers_bidir_batch_first": functools.partial(_zero_batch_gru, L=2, bidir=True,
                                                              batch_first=True, given_h0=True),
    "cell_batch0": _zero_batch_cell,
    "cell_hidden0": _zero_hidden_cell,
    "cell_input0": _zero_input_cell,
}


def _zero_case(target: str, reset_after: bool, case: str) -> None:
    with use_target(target):
        ZERO_CASES[case](target, reset_after)


# -- isolation: a fork server -------------------------------------------------------------------
#
# A case that may kill its process (a kernel dividing by a zero size: SIGFPE) runs in a process
# of its own. Starting Python and torch for each would cost seconds, and forking pytest itself is
# unsafe once torch's OpenMP threads have run (the child can hang). So one server process imports
# torch, grulab and these test modules and computes nothing; each case runs in a fork of it.

_HERE = os.path.dirname(os.path.abspath(__file__))
ISOLATED_TIMEOUT_S = 300


def _fork_server_main() -> None:
    """The server: one JSON request per stdin line ({"module", "fn", "args"}), one JSON answer per
    stdout line: "pass", "fail: <traceback>" or "died: <how>; <stderr>"."""
    import importlib
    import signal
    import tempfile
    import time

    proto = os.fdopen(os.dup(1), "w")  # answers go here; fd 1 and 2 of the cases go to files
    for name in ("test_torch_contract", "test_layout_fuzz"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for k in kernels.KERNELS:  # loads the native extension (no threads run)
        k.why_not(kernels.Query())
    for line in sys.stdin:
        req = json.loads(line)
        fn = getattr(importlib.import_module(req["module"]), req["fn"])
        out = tempfile.NamedTemporaryFile("w+", delete=False, suffix=".out")
        res = tempfile.NamedTemporaryFile("w+", delete=False, suffix=".res")
        out.close(), res.close()
        sys.stdout.flush(), sys.stderr.flush(), proto.flush()
        pid = os.fork()
        if pid == 0:  # the case
            code = 0
            try:
                fd = os.open(out.name, os.O_WRONLY)
                os.dup2(fd, 1), os.dup2(fd, 2)
                try:
                    fn(*req["args"])
                    answer = "pass"
                except BaseException:  # noqa: BLE001 - reported, whatever it is
                    answer = "fail: " + traceback.format_exc(limit=-4).strip()
                with open(res.name, "w") as f:
                    f.write(answer)
                sys.stdout.flush(), sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                code = 3
            os._exit(code)
        deadline = time.monotonic() + ISOLATED_TIMEOUT_S
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.002)
        with open(res.name) as f:
            answer = f.read()
        with open(out.name) as f:
            printed = f.read().strip()
        os.unlink(res.name), os.unlink(out.name)
        if status is None:
            answer = f"died: no answer after {ISOLATED_TIMEOUT_S} s (killed)"
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            answer = f"died: killed by signal {sig} ({signal.Signals(sig).name})"
        elif not answer:
            answer = f"died: exit status {os.WEXITSTATUS(status)}"
        if answer.startswith("died") and printed:
            answer += "; its output: " + printed[-1500:]
        proto.write(json.dumps(answer) + "\n")
        proto.flush()


class _ForkServer:
    proc: Optional[subprocess.Popen] = None

    def run(self, module: str, fn: str, args: list) -> str:
        if self.proc is None or self.proc.poll() is not None:
            code = f"import sys; sys.path.insert(0, {_HERE!r}); import test_torch_contract as t; t._fork_server_main()"
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self.proc.stdin.write(json.dumps({"module": module, "fn": fn, "args": args}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.kill()
            err = self.proc.stderr.read()[-2000:]
            self.proc = None
            return f"died: the fork server died; its stderr: {err}"
        return json.loads(line)


_server = _ForkServer()


def isolated(module: str, fn: str, *args) -> str:
    """Call module.fn(*args) in a fork of the clean server process: "pass", "fail: ...", "died: ..."."""
    return _server.run(module, fn, list(args))


@pytest.mark.parametrize("case", list(ZERO_CASES))
@pytest.mark.parametrize("reset_after", FORMS)
def test_zero_sizes(kernel, reset_after, case):
    """B = 0 forward and backward (GRU one and two layers, bidirectional, batch_first, with h0;
    GRUCell), GRUCell with hidden size 0 (test_RNN_cell_forward_zero_hidden_size) and input size 0:
    as torch.nn.GRU / GRUCell. Each case runs in a process of its own (a fork of a clean server)."""
    need(kernel, torch.float64 if case == "cell_input0" else torch.float32, reset_after)  # its dtype
    result = isolated("test_torch_contract", "_zero_case", kernel, reset_after, case)
    if result != "pass":
        pytest.fail(result, pytrace=False)


def test_gru_sizes_zero_refused_as_torch(kernel):
    """torch.nn.GRU refuses hidden_size 0 and input_size 0 (ValueError); GRUCell accepts both (above)."""
    for args, words in (((10, 0), "hidden_size must be greater than zero"),
                        ((0, 10), "input_size must be greater than zero")):
        with pytest.raises(ValueError, match=words):
            torch.nn.GRU(*args)
        with pytest.raises(ValueError, match=words):
            make_gru(kernel, *args)
    torch.nn.GRUCell(10, 0), torch.nn.GRUCell(0, 10)
    make_cell(kernel, 10, 0), make_cell(kernel, 0, 10)


# ---------------------------------------------------------------------------
# Issue 21: higher-order autograd, batched gradients, torch.func
# ---------------------------------------------------------------------------

DEEP_CONFIGS = [(1, False, False), (2, False, False), (1, True, False), (2, True, True)]  # (layers, bidir, bf)


@pytest.mark.parametrize("config", DEEP_CONFIGS, ids=[f"L{c[0]}-{'bi' if c[1] else 'uni'}{'-bf' if c[2] else ''}"
                                                      for c in DEEP_CONFIGS])
@pytest.mark.parametrize("reset_after", FORMS)
def test_gradgradcheck(kernel, reset_after, config):
    """Double backward: gradgradcheck (float64) of output and h_n with respect to x, h0 and every
    parameter, multi-layer and bidirectional (full mode for one layer, fast mode beyond)."""
    need(kernel, torch.float64, reset_after)
    L, bidir, bf = config
    D = 2 if bidir else 1
    m = make_gru(kernel, 3, 4, L, bidirectional=bidir, batch_first=bf, reset_after=reset_after, dtype=torch.float64)
    x = rand(*((2, 3, 3) if bf else (3, 2, 3)), seed=1).requires_grad_()
    h0 = rand(L * D, 2, 4, seed=2).mul(0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *a: _call_flat(m, 2, a), [x, h0] + list(m.parameters()),
                                        fast_mode=(L, D) != (1, 1))


@pytest.mark.parametrize("reset_after", FORMS)
def test_cell_gradgradcheck(kernel, reset_after):
    need(kernel, torch.float64, reset_after)
    m = make_cell(kernel, 3, 4, reset_after=reset_after, dtype=torch.float64)
    x, h = rand(2, 3, seed=1).requires_grad_(), rand(2, 4, seed=2).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *a: _call_flat(m, 2, a), [x, h] + list(m.parameters()))


def _double_backward(m, args):
    """Gradients of <grad(<outputs, g>), w> with respect to the arguments and parameters."""
    leaves = [a for a in args] + [p for _, p in m.named_parameters()]
    outs = outputs_of(m(*args))
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    s = sum((f * torch.randn(f.shape, generator=gen, dtype=torch.float64)).sum() for f in first)
    second = torch.autograd.grad(s, leaves, allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, l in zip(second, leaves)]


@pytest.mark.parametrize("config", DEEP_CONFIGS, ids=[f"L{c[0]}-{'bi' if c[1] else 'uni'}{'-bf' if c[2] else ''}"
                                                      for c in DEEP_CONFIGS])
@pytest.mark.parametrize("reset_after", FORMS)
def test_double_backward_equals_torch(kernel, reset_after, config):
    """Double backward's values (gradient penalties, Hessian-vector products) equal torch.nn.GRU's
    (reset-after) and the reference's (reset-before), for x, h0 and every parameter."""
    need(kernel, torch.float64, reset_after)
    L, bidir, bf = config
    D = 2 if bidir else 1
    m = make_gru(kernel, 3, 4, L, bidirectional=bidir, batch_first=bf, reset_after=reset_after, dtype=torch.float64)
    x = rand(*((2, 5, 3) if bf else (5, 2, 3)), seed=1).requires_grad_()
    h0 = rand(L * D, 2, 4, seed=2).mul(0.5).requires_grad_()
    got = _double_backward(m, (x, h0))
    r = twin(m)
    want = _double_backward(r, (to64(x), to64(h0)))
    names = ["x", "h0"] + [n for n, _ in m.named_parameters()]
    bad = [mismatch(a, b, torch.float64, f"second-order grad {n}") for n, a, b in zip(names, got, want)]
    assert not any(bad), "\n".join(b for b in bad if b)


def _batched_cases(target, reset_after, cell):
    if cell:
        m = make_cell(target, 3, 4, reset_after=reset_after, dtype=torch.float64)
        args = (rand(2, 3, seed=1).requires_grad_(), rand(2, 4, seed=2).requires_grad_())
    else:
        m = make_gru(target, 3, 3, 2, bidirectional=True, reset_after=reset_after, dtype=torch.float64)
        args = (rand(3, 2, 3, seed=1).requires_grad_(), rand(4, 2, 3, seed=2).requires_grad_())
    return m, args


@pytest.mark.parametrize("module", ["GRU", "GRUCell"])
@pytest.mark.parametrize("reset_after", FORMS)
def test_is_grads_batched(kernel, reset_after, module):
    """torch.autograd.grad(..., is_grads_batched=True): a batch of grad_outputs at once, as torch."""
    need(kernel, torch.float64, reset_after)
    m, args = _batched_cases(kernel, reset_after, module == "GRUCell")

    def batched(mod, a):
        outs = outputs_of(mod(*a))
        gen = torch.Generator().manual_seed(3)
        vs = [torch.randn((4,) + tuple(o.shape), generator=gen, dtype=torch.float64) for o in outs]
        return torch.autograd.grad(outs, list(a) + list(mod.parameters()), vs, is_grads_batched=True)

    got = batched(m, args)
    want = batched(twin(m), tuple(to64(a) for a in args))
    names = ["x", "h0"] + [n for n, _ in m.named_parameters()]
    bad = [mismatch(a, b, torch.float64, f"batched grad {n}") for n, a, b in zip(names, got, want)]
    assert not any(bad), "\n".join(b for b in bad if b)


@pytest.mark.parametrize("module", ["GRU", "GRUCell"])
@pytest.mark.parametrize("reset_after", FORMS)
def test_jacrev(kernel, reset_after, module):
    """torch.func.jacrev of the output with respect to the input (a vmap over the backward)."""
    need(kernel, torch.float64, reset_after)
    m, args = _batched_cases(kernel, reset_after, module == "GRUCell")
    x, h = (a.detach() for a in args)
    r = twin(m)
    got = torch.func.jacrev(lambda xx: outputs_of(m(xx, h))[0])(x)
    want = torch.func.jacrev(lambda xx: outputs_of(r(xx, h))[0])(x)
    assert not mismatch(got, want, torch.float64, "jacobian"), mismatch(got, want, torch.float64, "jacobian")


@pytest.mark.parametrize("module", ["GRU", "GRUCell"])
@pytest.mark.parametrize("reset_after", FORMS)
def test_vmap_over_vjp(kernel, reset_after, module):
    """torch.func.vmap over the vector-Jacobian product of torch.func.vjp."""
    need(kernel, torch.float64, reset_after)
    m, args = _batched_cases(kernel, reset_after, module == "GRUCell")
    x, h = (a.detach() for a in args)

    def run(mod):
        outs, vjp_fn = torch.func.vjp(lambda xx, hh: tuple(outputs_of(mod(xx, hh))), x, h)
        gen = torch.Generator().manual_seed(4)
        vs = tuple(torch.randn((3,) + tuple(o.shape), generator=gen, dtype=torch.float64) for o in outs)
        return torch.func.vmap(vjp_fn)(vs)

    got, want = run(m), run(twin(m))
    bad = [mismatch(a, b, torch.float64, f"vmapped vjp wrt {n}") for n, a, b in zip(("x", "h0"), got, want)]
    assert not any(bad), "\n".join(b for b in bad if b)


@pytest.mark.parametrize("module", ["GRU", "GRUCell"])
@pytest.mark.parametrize("reset_after", FORMS)
def test_func_grad_over_parameters(kernel, reset_after, module):
    """torch.func.grad of a loss over the parameters through torch.func.functional_call (the
    meta-learning pattern), as torch."""
    need(kernel, torch.float64, reset_after)
    m, args = _batched_cases(kernel, reset_after, module == "GRUCell")
    args = tuple(a.detach() for a in args)

    def run(mod):
        params = {n: p.detach() for n, p in mod.named_parameters()}

        def loss(ps):
            return sum((o * o).sum() for o in outputs_of(torch.func.functional_call(mod, ps, args)))

        return torch.func.grad(loss)(params)

    got, want = run(m), run(twin(m))
    bad = [mismatch(got[n], want[n], torch.float64, f"func.grad {n}") for n in want]
    assert not any(bad), "\n".join(b for b in bad if b)


@pytest.mark.parametrize("reset_after", FORMS)
def test_cell_vmap_forward(kernel, reset_after):
    """torch.func.vmap over GRUCell's forward (torch.nn.GRUCell supports it)."""
    need(kernel, torch.float64, reset_after)
    m = make_cell(kernel, 3, 4, reset_after=reset_after, dtype=torch.float64)
    xs, hs = rand(5, 2, 3, seed=1), rand(5, 2, 4, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(m)(xs, hs)
        want = torch.func.vmap(twin(m))(xs, hs)
    assert not mismatch(got, want, torch.float64, "vmap"), mismatch(got, want, torch.float64, "vmap")


# ---------------------------------------------------------------------------
# Issue 21: NaN and Inf
# ---------------------------------------------------------------------------


def _pattern(t: Tensor) -> Tensor:
    p = torch.zeros_like(t, dtype=torch.int8)
    p[torch.isnan(t)] = 1
    p[t == float("inf")] = 2
    p[t == float("-inf")] = 3
    return p


NAN_CASES = [  # (where, index, value)
    ("x", (1, 0, 2), float("nan")),
    ("x", (0, 1, 0), float("inf")),
    ("h0", (0, 1, 3), float("nan")),
    ("weight_hh_l0", (7, 3), float("nan")),
    ("bias_ih_l0", (14,), float("-inf")),
]


NAN_PARAMS = [(c, torch.float32) for c in NAN_CASES] + [(NAN_CASES[i], torch.float64) for i in (0, 3)]


@pytest.mark.parametrize("reset_after", FORMS)
@pytest.mark.parametrize("case,dtype", NAN_PARAMS, ids=[f"{w}{list(i)}={v}-{str(d)[6:]}".replace(" ", "") for (w, i, v), d in NAN_PARAMS])
def test_nan_inf(kernel, case, reset_after, dtype):
    """A NaN or ±Inf in the input, h0 or a parameter gives the yardstick's pattern of NaN / ±Inf /
    finite in output and h_n (and, for NaN, in every gradient); finite values agree."""
    need(kernel, dtype, reset_after)
    where, idx, value = case
    m = make_gru(kernel, 4, 6, reset_after=reset_after, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    h0 = (torch.randn(1, 3, 6, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    if where in ("x", "h0"):
        (x if where == "x" else h0)[idx] = value
    else:
        with torch.no_grad():
            getattr(m, where)[idx] = value
    got = forward_backward(m, (leaf(x), leaf(h0)))
    want = forward_backward(twin(m), (to64(leaf(x)), to64(leaf(h0))))
    pairs = list(zip(("output", "h_n"), got[0], want[0]))
    if value != value:  # NaN: gradients too
        pairs += [(f"grad {n}", got[1][n], want[1][n]) for n in want[1]]
    bad = []
    for name, a, b in pairs:
        pa, pb = _pattern(a), _pattern(b)
        if not torch.equal(pa, pb):
            bad.append(f"{name}: NaN/Inf pattern differs at {int((pa != pb).sum())} of {pa.numel()} places")
        else:
            fin = pb == 0
            bad.append(mismatch(a[fin], b[fin].to(torch.float64), dtype, name))
    bad = [b for b in bad if b]
    assert not bad, "\n".join(bad)
