"""grulab.GRU / GRUCell against torch.nn.GRU / GRUCell and the notes' formulas."""
import itertools
import warnings

import pytest
import torch
from torch.testing import assert_close

import grulab
from grulab import reference

F64 = dict(dtype=torch.float64, rtol=1e-9, atol=1e-9)

# (layers, bidirectional, batch_first, bias, unbatched, given hx)
CONFIGS = [
    c
    for c in itertools.product([1, 2, 3], [False, True], [False, True], [True, False], [False, True], [False, True])
    # keep the suite quick: every combination at 1 and 2 layers, a spread at 3
    if c[0] < 3 or sum(c[1:]) % 2 == 0
]


def _pair(impl, layers, bidir, batch_first, bias, dtype=torch.float64, reset_after=True, dropout=0.0):
    torch.manual_seed(0)
    ours = grulab.GRU(5, 7, layers, bias, batch_first, dropout, bidir, dtype=dtype,
                      reset_after=reset_after, impl=impl)
    theirs = torch.nn.GRU(5, 7, layers, bias, batch_first, dropout, bidir, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _inputs(layers, bidir, batch_first, unbatched, given_hx, T=4, B=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    D = 2 if bidir else 1
    shape = (T, 5) if unbatched else ((B, T, 5) if batch_first else (T, B, 5))
    x = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    hx = None
    if given_hx:
        hshape = (layers * D, 7) if unbatched else (layers * D, B, 7)
        hx = torch.randn(hshape, generator=g, dtype=dtype, requires_grad=True)
    return x, hx


def _run(module, x, hx):
    """Outputs, h_n, and the gradients of x, hx and every parameter."""
    out, h_n = module(x, hx)
    g = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + (
        h_n * torch.randn(h_n.shape, generator=g, dtype=out.dtype)
    ).sum()
    inputs = [x] + ([hx] if hx is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(loss, inputs)
    return out, h_n, dict(zip(["x", "hx"][: 1 + (hx is not None)] + [n for n, _ in module.named_parameters()],
                              grads))


@pytest.mark.parametrize("impl", ["reference", "auto", "torch"])
@pytest.mark.parametrize("layers,bidir,batch_first,bias,unbatched,given_hx", CONFIGS)
def test_gru_equals_torch(impl, layers, bidir, batch_first, bias, unbatched, given_hx):
    ours, theirs = _pair(impl, layers, bidir, batch_first, bias)
    x, hx = _inputs(layers, bidir, batch_first, unbatched, given_hx)
    out_a, h_a, g_a = _run(ours, x, hx)
    out_b, h_b, g_b = _run(theirs, x, hx)
    assert out_a.shape == out_b.shape and h_a.shape == h_b.shape
    assert_close(out_a, out_b, rtol=1e-9, atol=1e-9)
    assert_close(h_a, h_b, rtol=1e-9, atol=1e-9)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        assert_close(g_a[name], g_b[name], rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_state_dict_interchange_both_ways():
    ours = grulab.GRU(5, 7, num_layers=2, bidirectional=True)
    theirs = torch.nn.GRU(5, 7, num_layers=2, bidirectional=True)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for name, p in ours.state_dict().items():
        assert p.shape == theirs.state_dict()[name].shape
    ours.load_state_dict(theirs.state_dict())
    assert_close(ours.weight_hh_l1_reverse, theirs.weight_hh_l1_reverse)
    theirs2 = torch.nn.GRU(5, 7, num_layers=2, bidirectional=True)
    theirs2.load_state_dict(ours.state_dict())
    assert_close(theirs2.bias_ih_l0, theirs.bias_ih_l0)


def test_default_init_matches_torch_distribution():
    torch.manual_seed(0)
    ours = grulab.GRU(10, 64)
    torch.manual_seed(0)
    theirs = torch.nn.GRU(10, 64)
    # same bounds U(-1/sqrt(H), 1/sqrt(H)) and the same draws for the same seed
    for (n_a, a), (n_b, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n_a == n_b
        assert_close(a, b)
    bound = 1 / 64**0.5
    assert all(p.abs().max() <= bound for p in ours.parameters())


def test_dropout_between_layers_in_training_only():
    ours, theirs = _pair("reference", 3, False, False, True, dropout=0.5)
    x, _ = _inputs(3, False, False, False, False)
    ours.eval(), theirs.eval()
    assert_close(ours(x)[0], theirs(x)[0], rtol=1e-9, atol=1e-9)
    ours.train()
    torch.manual_seed(3)
    a = ours(x)[0]
    torch.manual_seed(4)
    b = ours(x)[0]
    assert not torch.allclose(a, b), "training-mode dropout should make two runs differ"
    one = grulab.GRU(5, 7, dtype=torch.float64, impl="reference").train()
    assert_close(one(x)[0], one(x)[0])  # a single layer has no dropout to apply


@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_equals_torch(bias):
    torch.manual_seed(0)
    for impl in ["reference", "auto", "torch"]:
        ours = grulab.GRUCell(5, 7, bias, dtype=torch.float64, impl=impl)
        theirs = torch.nn.GRUCell(5, 7, bias, dtype=torch.float64)
        theirs.load_state_dict(ours.state_dict())
        for x, hx in [
            (torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)),
            (torch.randn(3, 5, dtype=torch.float64), None),
            (torch.randn(5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)),
        ]:
            x.requires_grad_(True)
            a, b = ours(x, hx), theirs(x, hx)
            assert_close(a, b, rtol=1e-9, atol=1e-9)
            ga = torch.autograd.grad(a.sum(), [x, *ours.parameters()])
            gb = torch.autograd.grad(b.sum(), [x, *theirs.parameters()])
            for u, v in zip(ga, gb):
                assert_close(u, v, rtol=1e-9, atol=1e-9)


def _notes_loop(x, h, w_ih, w_hh, b_ih, b_hh):
    """The notes' (d2l) GRU, written independently with their own names:
    X @ W_x? + H @ W_h? + b, gate blocks in the notes' order, R applied before W_hh."""
    H = h.shape[-1]
    W_xr, W_xz, W_xh = (w_ih[i * H:(i + 1) * H].T for i in range(3))
    W_hr, W_hz, W_hh = (w_hh[i * H:(i + 1) * H].T for i in range(3))
    b_r = b_ih[:H] + b_hh[:H]
    b_z = b_ih[H:2 * H] + b_hh[H:2 * H]
    b_h = b_ih[2 * H:] + b_hh[2 * H:]
    outputs = []
    for X in x:
        Z = torch.sigmoid((X @ W_xz) + (h @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (h @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * h) @ W_hh) + b_h)
        h = Z * h + (1 - Z) * H_tilda
        outputs.append(h)
    return torch.stack(outputs), h


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_reset_before_equals_the_notes_loop(impl):
    torch.manual_seed(0)
    gru = grulab.GRU(5, 7, dtype=torch.float64, reset_after=False, impl=impl)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    h0 = torch.randn(1, 3, 7, dtype=torch.float64)
    out, h_n = gru(x, h0)
    ref_out, ref_h = _notes_loop(x, h0[0], gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert_close(h_n[0], ref_h, rtol=1e-12, atol=1e-12)
    # and the two forms really differ: reset_after is not a no-op
    after = grulab.GRU(5, 7, dtype=torch.float64, reset_after=True, impl=impl)
    after.load_state_dict(gru.state_dict())
    assert not torch.allclose(after(x, h0)[0], out)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(reset_after, bias):
    torch.manual_seed(0)
    gru = grulab.GRU(3, 4, 2, bias, bidirectional=True, dtype=torch.float64,
                     reset_after=reset_after, impl="reference")
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(gru.parameters())
    names = [n for n, _ in gru.named_parameters()]

    def f(x, h0, *ps):
        return torch.func.functional_call(gru, dict(zip(names, ps)), (x, h0))

    assert torch.autograd.gradcheck(f, (x, h0, *params))


def test_update_gate_zero_reset_gate_one_is_a_plain_rnn():
    """The notes: with Z -> 0 and R -> 1 the GRU is the plain tanh RNN."""
    torch.manual_seed(0)
    H, I = 6, 4
    rnn = torch.nn.RNN(I, H, nonlinearity="tanh", dtype=torch.float64)
    for reset_after in [True, False]:
        gru = grulab.GRU(I, H, dtype=torch.float64, reset_after=reset_after, impl="reference")
        with torch.no_grad():
            gru.weight_ih_l0.zero_()
            gru.weight_hh_l0.zero_()
            gru.bias_ih_l0.zero_()
            gru.bias_hh_l0.zero_()
            gru.bias_ih_l0[:H] = 50.0  # r = σ(50) ≈ 1
            gru.bias_ih_l0[H:2 * H] = -50.0  # z = σ(-50) ≈ 0
            gru.weight_ih_l0[2 * H:] = rnn.weight_ih_l0
            gru.weight_hh_l0[2 * H:] = rnn.weight_hh_l0
            gru.bias_ih_l0[2 * H:] = rnn.bias_ih_l0
            gru.bias_hh_l0[2 * H:] = rnn.bias_hh_l0
        x = torch.randn(10, 2, I, dtype=torch.float64)
        h0 = torch.randn(1, 2, H, dtype=torch.float64)
        assert_close(gru(x, h0)[0], rnn(x, h0)[0], rtol=1e-12, atol=1e-12)


def test_update_convention_swap():
    """h = (1-z')h + z'n (one note's form) is this cell with the update gate's parameters negated."""
    torch.manual_seed(0)
    gru = grulab.GRU(4, 5, dtype=torch.float64, impl="reference")
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    h = torch.zeros(2, 5, dtype=torch.float64)
    w_ih, w_hh, b_ih, b_hh = (p.detach().clone() for p in gru.all_weights[0])
    for t in range(3):
        s = reference.gru_step(x[t], h, -w_ih, -w_hh, -b_ih, -b_hh)  # z' = σ(-a) = 1 - z
        step = reference.gru_step(x[t], h, w_ih, w_hh, b_ih, b_hh)
        assert_close(s.z, 1 - step.z)
        swapped_h = (1 - s.z) * h + s.z * step.n
        assert_close(swapped_h, step.h)
        h = step.h


# -- errors, as torch raises them ----------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(hidden_size=2.5), TypeError, "hidden_size should be of type int, got: float"),
        (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero"),
        (dict(hidden_size=4, num_layers=0), ValueError, "num_layers must be greater than zero"),
        (dict(hidden_size=4, dropout=1.5), ValueError, "dropout should be a number in range [0, 1]"),
        (dict(hidden_size=4, dropout=-0.1), ValueError, "dropout should be a number in range [0, 1]"),
    ],
)
def test_constructor_errors_match_torch(kwargs, exc, words):
    with pytest.raises(exc, match=None) as ours:
        grulab.GRU(3, **kwargs)
    assert words in str(ours.value)
    with pytest.raises(exc):
        torch.nn.GRU(3, **kwargs)


def test_grulab_specific_option_errors():
    with pytest.raises(ValueError, match="impl must be one of"):
        grulab.GRU(3, 4, impl="cuda")
    with pytest.raises(ValueError, match="reset_after=False use impl="):
        grulab.GRU(3, 4, reset_after=False, impl="torch")
    with pytest.raises(TypeError, match="reset_after should be of type bool"):
        grulab.GRU(3, 4, reset_after="yes")


def test_dropout_warning_for_one_layer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grulab.GRU(3, 4, dropout=0.5)
    assert any("num_layers greater than 1" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "x,hx,exc,words",
    [
        (torch.randn(2, 3, 4, 5), None, ValueError, "Expected input to be 2D or 3D, got 4D"),
        (torch.randn(2, 3, 5), None, RuntimeError, "Expected 4, got 5"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 6), RuntimeError, "Expected hidden size (1, 3, 6), got [2, 3, 6]"),
        (torch.randn(2, 4), torch.randn(1, 3, 6), RuntimeError, "hx should also be 2-D but got 3-D"),
        (torch.randn(2, 3, 4), torch.randn(3, 6), RuntimeError, "hx should also be 3-D but got 2-D"),
        (torch.randn(2, 3, 4, dtype=torch.float64), None, ValueError, "does not match weight dtype"),
    ],
)
def test_forward_errors_match_torch(x, hx, exc, words):
    ours = grulab.GRU(4, 6, impl="reference")
    theirs = torch.nn.GRU(4, 6)
    with pytest.raises(exc) as e:
        ours(x, hx)
    assert words in str(e.value)
    with pytest.raises(exc):
        theirs(x, hx)


@pytest.mark.parametrize(
    "x,hx,exc,words",
    [
        (torch.randn(2, 5), None, RuntimeError, "inconsistent input_size: got 5 expected 4"),
        (torch.randn(2, 3, 4), None, ValueError, "Expected input to be 1D or 2D, got 3D"),
        (torch.randn(2, 4), torch.randn(3, 6), RuntimeError, "batch size 2 doesn't match hidden0 batch size 3"),
        (torch.randn(2, 4), torch.randn(2, 5), RuntimeError, "inconsistent hidden_size: got 5, expected 6"),
    ],
)
def test_cell_errors_match_torch(x, hx, exc, words):
    with pytest.raises(exc) as e:
        grulab.GRUCell(4, 6, impl="reference")(x, hx)
    assert words in str(e.value)
    with pytest.raises(exc):
        torch.nn.GRUCell(4, 6)(x, hx)


def test_repr_and_compat_helpers():
    gru = grulab.GRU(3, 4, num_layers=2, reset_after=False, impl="reference")
    assert "num_layers=2" in repr(gru) and "reset_after=False" in repr(gru)
    assert len(gru.all_weights) == 2 and len(gru.all_weights[0]) == 4


def test_flatten_parameters_lets_torch_code_run_unchanged():
    """What flatten_parameters promises: code written for torch.nn.GRU that calls it (as after
    DataParallel or .to()) runs unchanged and computes what torch does; it changes no parameter."""

    def torch_style_forward(rnn, x):  # the pattern of torch code: flatten, then run
        rnn.flatten_parameters()
        return rnn(x)

    torch.manual_seed(0)
    reference_gru = torch.nn.GRU(3, 4, num_layers=2)
    gru = grulab.GRU(3, 4, num_layers=2)
    gru.load_state_dict(reference_gru.state_dict())
    params = [(name, p, p.detach().clone()) for name, p in gru.named_parameters()]
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        out, h = torch_style_forward(gru, x)
        want_out, want_h = torch_style_forward(reference_gru, x)
    assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_close(h, want_h, rtol=1e-5, atol=1e-6)
    assert gru.flatten_parameters() is None
    for (name, before, value), (name2, after) in zip(params, gru.named_parameters()):
        assert name == name2 and after is before and torch.equal(after, value)  # the same tensors, untouched


@pytest.mark.parametrize("impl", ["reference", "fused", "torch"])
@pytest.mark.parametrize("layers,bidir,enforce_sorted,given_hx", [
    (1, False, False, False), (2, True, False, True), (1, True, True, True), (3, False, True, False)])
def test_packed_sequence_equals_torch(impl, layers, bidir, enforce_sorted, given_hx):
    """Variable-length batches as PackedSequence: outputs, h_n and gradients as torch.nn.GRU."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    ours, theirs = _pair(impl, layers, bidir, False, True)
    lengths = torch.tensor([5, 5, 3, 2, 1] if enforce_sorted else [2, 5, 1, 5, 3])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    D = 2 if bidir else 1
    hx = torch.randn(layers * D, 5, 7, generator=g, dtype=torch.float64, requires_grad=True) if given_hx else None
    results = []
    for module in (ours, theirs):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        out, h_n = module(packed, hx)
        assert type(out).__name__ == "PackedSequence"
        padded, out_lengths = pad_packed_sequence(out)
        assert torch.equal(out_lengths, lengths)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=torch.float64).view_as(padded)).sum() \
            + (h_n ** 2).sum()
        grads = torch.autograd.grad(loss, [x] + ([hx] if given_hx else []) + list(module.parameters()))
        results.append((padded, h_n, grads))
    (pa, ha, ga), (pb, hb, gb) = results
    assert_close(pa, pb, rtol=1e-9, atol=1e-9)
    assert_close(ha, hb, rtol=1e-9, atol=1e-9)
    for a, b in zip(ga, gb):
        assert_close(a, b, rtol=1e-9, atol=1e-9)
