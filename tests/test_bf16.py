"""bf16 under torch.autocast("cpu", dtype=torch.bfloat16), and bfloat16 parameters.

The bf16 kernel (native-avx512bf16: vdpbf16ps tiles per step, oneDNN bf16 GEMMs per chunk) is
held to float64: output and every gradient within 3e-2 of it, relative to the largest entry, at
the seed and the large shape, both cell forms, 1 and 2 threads. The rest: what runs where (and
why not), the module's forms (layers, directions, PackedSequence, batch_first, gru_step), NaN and
Inf as in float32, bfloat16 parameters, autotune, and ``grulab train --precision``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import grulab
from grulab import kernels, reference
from grulab.kernels import autotune, fused

BF16 = "native-avx512bf16"
AMX = "native-amx"
# the kernel an autocast call gets here: native-amx where the CPU has AMX-BF16, else BF16, else None
CHOSEN = kernels.first_native(kernels.Query(autocast=True))[0] if kernels.has_bf16_units() else None
HAS = kernels.has_bf16_units()
needs_bf16 = pytest.mark.skipif(not HAS, reason="this CPU has no bf16 units (AVX512-BF16)")
TOL = 3e-2  # relative to the largest entry


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def layer_case(T, B, I, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64) * 0.5
    w = [(torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) * k
         for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    go = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    gh = torch.randn(B, H, generator=g, dtype=torch.float64)
    return [x, h0, *w], go, gh


def grads_of(fn, leaves, go, gh):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, h_T = fn(*leaves)
    grads = torch.autograd.grad((out * go.to(out.dtype)).sum() + (h_T * gh.to(h_T.dtype)).sum(), leaves)
    return [out.detach(), h_T.detach(), *grads]


# -- what runs where --------------------------------------------------------------------------


def test_registry_says_why():
    bf16 = kernels.BY_NAME[BF16]
    plain = bf16.why_not(kernels.Query())
    assert plain is not None and "autocast" in plain
    under = bf16.why_not(kernels.Query(autocast=True))
    if HAS:
        assert under is None
        assert kernels.select_name("fused", "cpu", torch.float32, True, True) == CHOSEN in (AMX, BF16)
        assert bf16.why_not(kernels.Query(dtype=torch.bfloat16)) is None
    else:
        assert "this CPU has no bf16 units" in under
        # the float32 kernel runs the autocast call instead
        assert not kernels.BY_NAME[kernels.select_name("fused", "cpu", torch.float32, True, True)].bf16
    assert not kernels.BY_NAME[kernels.select_name("fused", "cpu", torch.float32, True, False)].bf16
    assert "float32 under autocast" in bf16.why_not(kernels.Query(dtype=torch.float64, autocast=True))


def test_kernels_command_names_the_bf16_kernel():
    out = subprocess.run([sys.executable, "-m", "grulab", "kernels"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert BF16 in out.stdout and "runs under torch.autocast" in out.stdout
    out = subprocess.run([sys.executable, "-m", "grulab", "kernels", "--autocast-bf16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if BF16 in l)
    assert ("-> " + BF16 in line) if CHOSEN == BF16 else ("this CPU has no bf16 units" in line) if not HAS \
        else ("runs" in line), line
    line = next(l for l in out.stdout.splitlines() if AMX in l)
    assert ("-> " + AMX in line) if CHOSEN == AMX else ("no: " in line and "AMX" in line), line


@needs_bf16
def test_kernels_shape_plan_under_autocast(tmp_path):
    env = {**__import__("os").environ, "GRULAB_AUTOTUNE": "0"}
    out = subprocess.run([sys.executable, "-m", "grulab", "kernels", "--shape", "35,32,28,256", "--train",
                          "--autocast-bf16"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"kernel: {CHOSEN}" in out.stdout and "bf16 products" in out.stdout, out.stdout


@needs_bf16
def test_native_plan_says_bf16():
    from grulab.kernels import native

    p = native.load().plan("avx512bf16", True, 35, 32, 28, 256, True, 2)
    assert p["forward"]["bf16"] and p["backward"]["bf16"]
    p = native.load().plan("avx512bf16", True, 35, 1, 28, 256, True, 2)  # a batch of 1: bf16 too
    assert p["forward"]["bf16"] and p["backward"]["bf16"]
    assert not native.load().plan("avx512bf16", True, 35, 1, 28, 255, True, 2)["forward"]["bf16"]  # odd H
    for B, bf16 in ((1, False), (2, True), (7, True)):  # reset_after=False: bf16 from 2 rows, split by rows
        p = native.load().plan("avx512bf16", True, 35, B, 28, 256, False, 2)
        assert p["forward"]["bf16"] == p["backward"]["bf16"] == bf16, (B, p)
        assert bf16 <= (p["forward"]["split"] == "rows")
    assert not native.load().plan("avx512", True, 35, 32, 28, 256, True, 2)["forward"]["bf16"]


# -- accuracy against float64 -----------------------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("shape", [(35, 32, 28, 256), (100, 64, 256, 1024), (7, 9, 5, 34), (6, 5, 3, 100),
                                   (35, 1, 28, 256)],
                         ids=["seed", "large", "odd-I", "partial-panel", "batch-of-1"])
def test_within_3e2_of_float64(shape, reset_after, threads):
    leaves, go, gh = layer_case(*shape)
    # float64 yardstick: the reference's equations; at the large shape the native float64 loops (tested
    # against them in test_fused), whose memory stays small (autograd's graph of the reference is ~1 GB there)
    large = shape[3] >= 1024
    float64 = (lambda *a: fused.gru_layer(*a, reset_after, backend="native")) if large else \
        (lambda *a: reference.gru_layer(*a, reset_after))
    want = grads_of(float64, leaves, go, gh)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with autocast():
            got = grads_of(lambda *a: fused.gru_layer(*a, reset_after, backend=BF16), [t.float() for t in leaves], go, gh)
    finally:
        torch.set_num_threads(before)
    names = ["out", "h_T", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32, name
        assert rel(a, b) < TOL, (name, rel(a, b))
    # and it ran in bf16 where the native plan says so (reset_after=False with one row: float32)
    from grulab.kernels import native

    T, B, I, H = shape
    if native.load().plan("avx512bf16", True, T, B, I, H, reset_after, threads)["forward"]["bf16"]:
        assert rel(got[0], want[0]) > 1e-5
    else:
        assert rel(got[0], want[0]) < 1e-5


@needs_bf16
@pytest.mark.parametrize("reset_after", [True, False])
def test_same_bits_on_1_and_2_threads(reset_after):
    """The governor may run a shape on 1 thread or 2: the bf16 kernel's results do not depend on it."""
    from grulab.kernels import native

    m = native.load()
    leaves, go, _ = layer_case(35, 32, 28, 256, seed=7)
    x, h0, w_ih, w_hh, b_ih, b_hh = (t.float() for t in leaves)
    got = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, _, saved = m.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, "avx512bf16", n)
            grads = m.backward(go.float(), None, x, h0, w_ih, w_hh, out, saved, reset_after, True, True, True, True,
                               "avx512bf16", n, 0)
            got.append([out, *grads])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*got):
        assert torch.equal(a, b)


@needs_bf16
def test_auto_kernel_under_autocast_is_bf16_and_leaves_float32_alone():
    x = torch.randn(5, 4, 6)
    m = grulab.GRU(6, 16, impl="fused")
    out32, _ = m(x)
    with autocast():
        out, h = m(x)
    assert out.dtype == h.dtype == torch.float32
    assert 0 < rel(out, out32) < TOL
    out_again, _ = m(x)  # autocast off again: the float32 kernel, the same bits as before
    assert torch.equal(out_again, out32)


# -- the module's forms -----------------------------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("reset_after", [True, False])
def test_module_forms_under_autocast(reset_after):
    torch.manual_seed(0)
    m = grulab.GRU(12, 48, num_layers=2, bidirectional=True, batch_first=True, impl="fused",
                   reset_after=reset_after)
    m64 = grulab.GRU(12, 48, num_layers=2, bidirectional=True, batch_first=True, impl="reference",
                     reset_after=reset_after, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(6, 9, 12)
    h0 = torch.randn(4, 6, 48) * 0.3
    with autocast():
        out, h = m(x, h0)
    want, want_h = m64(x.double(), h0.double())
    assert out.dtype == torch.float32 and rel(out, want) < TOL and rel(h, want_h) < TOL
    # PackedSequence: each sequence stops at its length
    lengths = torch.tensor([9, 7, 7, 4, 2, 1])
    with autocast():
        po, ph = m(pack_padded_sequence(x, lengths, batch_first=True))
    wo, wh = m64(pack_padded_sequence(x.double(), lengths, batch_first=True))
    assert rel(po.data, wo.data) < TOL and rel(ph, wh) < TOL
    # gradients of the whole stack
    with autocast():
        out, h = m(x, h0)
    (out.sum() + h.sum()).backward()
    (want.sum() + want_h.sum()).backward()
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        assert p.grad.dtype == torch.float32 and rel(p.grad, p64.grad) < TOL, name


@needs_bf16
def test_gru_step_and_cell_under_autocast():
    torch.manual_seed(1)
    cell = grulab.GRUCell(10, 32, impl="fused")
    x, h = torch.randn(3, 10), torch.randn(3, 32)
    want = cell(x, h)
    with autocast(), torch.no_grad():
        got = cell(x, h)
        step = fused.gru_step(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert got.dtype == step.dtype == torch.float32
    assert rel(got, want) < TOL and rel(step, want) < TOL


# -- NaN and Inf as in float32 ----------------------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "h0", "w_hh"])
@pytest.mark.parametrize("bf16_params", [False, True])
def test_nonfinite_propagates_as_in_float32(bad, where, bf16_params):
    torch.manual_seed(2)
    T, B, I, H = 6, 8, 5, 32
    ref = torch.nn.GRU(I, H)
    m = grulab.GRU(I, H, impl="fused")
    m.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(T, B, I), torch.zeros(1, B, H)
    with torch.no_grad():
        if where == "x":
            x[2, 3, 1] = bad
        elif where == "h0":
            h0[0, 5, 7] = bad
        else:
            ref.weight_hh_l0[40, 3] = bad
            m.weight_hh_l0[40, 3] = bad
    want, _ = ref(x, h0)
    if bf16_params:
        got, _ = m.bfloat16()(x.bfloat16(), h0.bfloat16())
    else:
        with autocast():
            got, _ = m(x, h0)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


# -- bfloat16 parameters ----------------------------------------------------------------------


@needs_bf16
def test_bfloat16_parameters():
    torch.manual_seed(3)
    m = grulab.GRU(28, 64, impl="fused").bfloat16()
    tm = torch.nn.GRU(28, 64).bfloat16()
    tm.load_state_dict(m.state_dict())
    m64 = torch.nn.GRU(28, 64).double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(10, 4, 28).bfloat16()
    out, h = m(x)
    assert out.dtype == h.dtype == torch.bfloat16
    want, _ = m64(x.double())
    assert rel(out, want) < TOL
    assert rel(tm(x)[0], want) < TOL  # torch's own bf16 GRU as a yardstick of the same error
    out.float().sum().backward()
    want.sum().backward()
    assert m.weight_hh_l0.grad.dtype == torch.bfloat16
    assert rel(m.weight_hh_l0.grad, m64.weight_hh_l0.grad) < TOL


# -- autotune ---------------------------------------------------------------------------------


@needs_bf16
def test_autotune_times_bf16_and_float32(tmp_path, monkeypatch):
    monkeypatch.setenv("GRULAB_CACHE", str(tmp_path))
    monkeypatch.delenv("GRULAB_KERNEL", raising=False)
    monkeypatch.setenv("GRULAB_AUTOTUNE", "1")
    autotune.forget()
    m = grulab.GRU(8, 64)
    x = torch.randn(12, 16, 8)
    with autocast():
        m(x)[0].sum().backward()
    (key, entry), = [(k, e) for k, e in autotune.recorded().items() if "autocast=bf16" in k]
    assert BF16 in entry["ms"] and any(n.startswith("native-avx512") and n != BF16 for n in entry["ms"])
    fastest = min(entry["ms"], key=entry["ms"].get)
    assert entry["kernel"] in (fastest, next(iter(entry["ms"])))  # the fastest, or the static choice by a margin
    autotune.forget()


# -- grulab train --precision -----------------------------------------------------------------


def _train(tmp_path, *flags):
    cmd = [sys.executable, "-m", "grulab", "train", "--corpus", "austen", "--max-tokens", "20000", "--epochs", "1",
           "--max-minutes", "0", "--batch-size", "8", "--num-steps", "16", "--hidden", "32", "--no-progress",
           "--out", str(tmp_path / "run"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_train_precision(tmp_path, precision):
    proc = _train(tmp_path, "--precision", precision)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    if precision == "auto" and HAS:  # bf16 where its steps measured AUTO_GAIN x fp32's or more, and says so
        from grulab.lm.train import AUTO_GAIN

        gain = float(re.search(r"bf16 steps measured ([0-9.]+)x fp32's", first).group(1))
        ran = "bf16" if gain >= AUTO_GAIN else "fp32"
    else:
        ran = "bf16" if precision == "bf16" else "fp32"
    assert f"precision {ran} (--precision {precision}" in first, first
    if precision == "auto":
        assert ("has bf16 units" if HAS else "has no bf16 units") in first
    from grulab.lm import checkpoint

    ck = checkpoint.load(tmp_path / "run")  # master weights: float32
    assert {p.dtype for p in ck.model.parameters()} == {torch.float32}
    assert ck.train["precision"] == precision
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["val_ppl"] < 80


def test_train_precision_refuses_a_bad_value(tmp_path):
    proc = _train(tmp_path, "--precision", "fp16")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--precision" in proc.stderr and "fp32" in proc.stderr


# -- torch's contract, in bf16: layouts and edges against torch.nn.GRU float32 ---------------


@needs_bf16
@pytest.mark.parametrize("layers,bidir,bias,batch_first", [(1, False, True, False), (2, True, True, True),
                                                           (1, True, False, False), (3, False, False, True)])
@pytest.mark.parametrize("reset_after", [True, False])
def test_equivalent_to_torch_gru_under_autocast(layers, bidir, bias, batch_first, reset_after):
    torch.manual_seed(4)
    ref = torch.nn.GRU(10, 40, num_layers=layers, bidirectional=bidir, bias=bias, batch_first=batch_first)
    m = grulab.GRU(10, 40, num_layers=layers, bidirectional=bidir, bias=bias, batch_first=batch_first,
                   impl="fused", reset_after=reset_after)
    m.load_state_dict(ref.state_dict())
    want_m = ref if reset_after else grulab.GRU(10, 40, num_layers=layers, bidirectional=bidir, bias=bias,
                                                batch_first=batch_first, impl="fused", reset_after=False)
    want_m.load_state_dict(ref.state_dict())
    D = 2 if bidir else 1
    x = torch.randn(16, 7, 10) if batch_first else torch.randn(7, 16, 10)
    h0 = torch.randn(layers * D, 16, 40) * 0.3
    for args in ((x,), (x, h0), (x.transpose(0, 1).contiguous().transpose(0, 1), h0),  # non-contiguous
                 (x, torch.randn(layers * D, 1, 40).expand(-1, 16, -1))):            # expanded h0
        with autocast():
            out, h = m(*args)
        want, want_h = want_m(*args)  # float32
        assert out.dtype == torch.float32 and out.shape == want.shape and h.shape == want_h.shape
        assert rel(out, want) < TOL and rel(h, want_h) < TOL


@needs_bf16
def test_edges_under_autocast():
    m = grulab.GRU(6, 32, impl="fused")
    with autocast():
        out, h = m(torch.randn(5, 6))  # unbatched
        assert out.shape == (5, 32) and h.shape == (1, 32)
        out, h = m(torch.randn(4, 0, 6))  # zero batch: torch's empty semantics
        assert out.shape == (4, 0, 32) and h.shape == (1, 0, 32)
        with pytest.raises(RuntimeError, match="sequence length"):
            m(torch.randn(0, 3, 6))
        with pytest.raises(ValueError, match="dtype"):
            m(torch.randn(4, 3, 6, dtype=torch.float64))


@needs_bf16
def test_double_backward_under_autocast():
    """create_graph under autocast takes the differentiable route (the reference's equations, in
    float32: the backends run with autocast off): second derivatives exist and match float32's."""
    torch.manual_seed(5)
    m = grulab.GRU(4, 8, impl="fused")
    x = torch.randn(3, 2, 4, requires_grad=True)

    def hvp(autocast_on):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
            out, _ = m(x)
        g, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    assert rel(hvp(True), hvp(False)) < TOL


@needs_bf16
def test_compile_under_autocast_runs_the_bf16_kernel():
    """torch.compile(fullgraph=True) under autocast: one operator node, the bf16 kernel (the same bits as
    eager under autocast, not float32's), and gradients through it."""
    torch.manual_seed(6)
    m = grulab.GRU(8, 32, impl="fused")
    x = torch.randn(5, 4, 8)
    compiled = torch.compile(m, fullgraph=True)
    with autocast():
        got, h = compiled(x)
        eager, eager_h = m(x)
    assert torch.equal(got, eager) and torch.equal(h, eager_h)
    assert not torch.equal(got, m(x)[0])  # float32 gives other bits
    got.sum().backward()
    assert m.weight_hh_l0.grad is not None and torch.isfinite(m.weight_hh_l0.grad).all()


@needs_bf16
def test_forced_bf16_kernel_under_autocast(monkeypatch):
    monkeypatch.setenv("GRULAB_KERNEL", BF16)
    fused.forget_choices()
    try:
        m = grulab.GRU(6, 16, impl="fused")
        with autocast():
            out, _ = m(torch.randn(4, 3, 6))
        assert out.dtype == torch.float32
        with pytest.raises(RuntimeError, match="GRULAB_KERNEL=native-avx512bf16 cannot run here: runs under"):
            m(torch.randn(4, 3, 6))  # float32 without autocast: the forced kernel says why not
    finally:
        monkeypatch.delenv("GRULAB_KERNEL")
        fused.forget_choices()


# -- AMX tiles (native-amx) ---------------------------------------------------------------------
#
# The amx table's loops run 16 rows at a time on AMX tiles. The same code compiled on tiles
# emulated in software (the native table "amx-emulated", for tests only) runs on any CPU with
# AVX512-BF16, so the row blocks, strides, column tails and partial panels are tested here on
# every such CPU; the real tiles where the CPU has them.

HAS_AMX = CHOSEN == AMX
# CPUID, the OS's grant and the tiles' known product, before the check against the vdpbf16ps loops
HAS_AMX_UNITS = (_mod := kernels.native.load()) is not None and _mod.amx_unavailable() == ""


def native_case(T, B, I, H, reset_after, isa, threads=2, seed=0):
    """[out, dx, dh0, dw_ih, dw_hh, db_ih, db_hh] of the native loops of ``isa`` (float32 under bf16
    products) and the reference's in float64, on the same random layer."""
    from grulab.kernels import native

    mod = native.load()
    (x, h0, w_ih, w_hh, b_ih, b_hh), go, _ = layer_case(T, B, I, H, seed)
    f32 = [t.float() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    out, _, saved = mod.forward(*f32, reset_after, True, isa, threads)
    grads = mod.backward(go.float(), None, f32[0], f32[1], f32[2], f32[3], out, saved, reset_after,
                         True, True, True, True, isa, threads, 0)
    leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    o, _ = reference.gru_layer(*leaves, reset_after)
    want = [o.detach(), *torch.autograd.grad((o * go).sum(), leaves)]
    return [out, *[g for g in grads if g is not None]], want


AMX_SHAPES = [(7, 32, 28, 256), (5, 9, 5, 34), (6, 20, 40, 96), (4, 1, 28, 64), (3, 40, 3, 100)]
AMX_IDS = ["seed-like", "odd-I-partial-panel", "rows-past-a-tile", "batch-of-1", "tails"]


@needs_bf16
def test_amx_self_check_emulated():
    from grulab.kernels import native

    assert native.load().amx_self_check("amx-emulated")


@needs_bf16
def test_the_tiles_are_checked_against_the_vdpbf16ps_loops_before_use():
    """native-amx's last why_not check (kernels.tiles_disagree, run once where the CPU has AMX): the
    emulated tiles pass it; loops that compute otherwise (float32 products instead of bf16) fail it,
    with a reason that names the result and the shape."""
    from grulab.kernels import native

    mod = native.load()
    assert kernels.tiles_disagree(mod, "amx-emulated") is None
    why = kernels.tiles_disagree(mod, "avx512bf16", "avx512")
    assert why is not None and "disagree with avx512's" in why and "(T, B, I, H) = (3, 20, 37, 80)" in why, why


@pytest.mark.skipif(not HAS_AMX_UNITS, reason="this CPU has no AMX-BF16 tiles (or the OS did not grant them)")
def test_real_tiles_pass_the_check_before_use():
    """Where the CPU has the tiles, they must pass that check: a failure would quietly hand the calls
    to native-avx512bf16 (users safe, AMX lost), so here it is loud."""
    from grulab.kernels import native

    assert kernels.tiles_disagree(native.load()) is None


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=AMX_IDS)
def test_amx_tiles_emulated_match_the_bf16_kernel_and_float64(shape, reset_after, threads):
    """The AMX loops on emulated tiles: within 3e-2 of float64 like the bf16 kernel, and within 3e-3 of
    the vdpbf16ps loops (the same bf16 operands; the float32 sums in another order, and where that
    moves a gate gradient across a bf16 rounding boundary, the chunk GEMMs see one ulp more)."""
    got, want = native_case(*shape, reset_after, "amx-emulated", threads)
    vdp, _ = native_case(*shape, reset_after, "avx512bf16", threads)
    names = ["out", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    for name, a, b, c in zip(names, got, vdp, want):
        assert rel(a, c) < TOL, (name, rel(a, c))
        assert rel(a, b) < 3e-3, (name, rel(a, b))
    T, B, I, H = shape
    if native_plan_bf16(T, B, I, H, reset_after):
        assert rel(got[0], want[0]) > 1e-5  # bf16 products ran
        assert not torch.equal(got[0], vdp[0])  # on other code than vdpbf16ps's (other sums' order)


def native_plan_bf16(T, B, I, H, reset_after) -> bool:
    from grulab.kernels import native

    return native.load().plan("avx512bf16", True, T, B, I, H, reset_after, 2)["forward"]["bf16"]


def test_amx_kernel_says_why_not():
    why = kernels.BY_NAME[AMX].why_not(kernels.Query(autocast=True))
    if HAS_AMX:
        assert why is None
    else:
        assert why is not None and "AMX" in why, why
        assert kernels.select_name("fused", "cpu", torch.float32, True, True) != AMX


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX-BF16 tiles (or the OS did not grant them)")
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=AMX_IDS)
def test_amx_tiles_match_their_emulation(shape, reset_after):
    """The real tiles give the emulated tiles' results (the same sums, to the float32 rounding of each)."""
    from grulab.kernels import native

    assert native.load().amx_self_check("amx")
    got, want = native_case(*shape, reset_after, "amx")
    emu, _ = native_case(*shape, reset_after, "amx-emulated")
    for a, b, c in zip(got, emu, want):
        assert rel(a, c) < TOL
        assert rel(a, b) < 3e-3
