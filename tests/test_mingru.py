"""grulab.MinGRU and MinGRUBlocks against independent loops of the paper's formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grulab
from grulab import mingru
from grulab.mingru import MinGRU, MinGRUBlocks

SCANS = ["fused", "log", "loop"]


def paper_layer(x, h0, w, b, candidate):
    """Feng et al. (2024), Algorithm 1/2 written out: x (T, B, I), h0 (B, H) -> (T, B, H)."""
    H = h0.shape[-1]
    W_z, W_h = w[:H], w[H:]
    b_z, b_h = (b[:H], b[H:]) if b is not None else (0, 0)
    h, outs = h0, []
    for x_t in x:
        z = torch.sigmoid(x_t @ W_z.T + b_z)
        v = x_t @ W_h.T + b_h
        h_tilde = torch.where(v >= 0, v + 0.5, torch.sigmoid(v)) if candidate == "g" else v
        h = (1 - z) * h + z * h_tilde
        outs.append(h)
    return torch.stack(outs)


def paper_stack(m: MinGRU, x, h0):
    """Layer by layer (one direction), with the module's weights: (T, B, H), (L, B, H)."""
    hs = []
    for k, (w, b) in enumerate(m.all_weights):
        x = paper_layer(x, h0[k], w, b, m.candidate)
        hs.append(x[-1])
    return x, torch.stack(hs)


def negative_state(L, B, H):
    return -3 * torch.rand(L, B, H, dtype=torch.float64) - 0.5  # all negative


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("candidate", ["g", "linear"])
def test_matches_paper_loop_with_negative_h0(scan, candidate):
    if scan == "log" and candidate == "linear":
        pytest.skip("log-space needs the positive candidate")
    torch.manual_seed(0)
    # B·H large enough that the fused scan works in several tiles of steps (C = 4 here).
    m = MinGRU(6, 256, num_layers=2, candidate=candidate, scan=scan).double()
    x = 2 * torch.randn(10, 64, 6, dtype=torch.float64)
    h0 = negative_state(2, 64, 256)
    out, h_n = m(x, h0)
    ref_out, ref_h = paper_stack(m, x, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n, ref_h)


@pytest.mark.parametrize("scan", SCANS)
def test_gradients_match_paper_loop(scan):
    torch.manual_seed(1)
    m = MinGRU(5, 7, num_layers=2, scan=scan).double()
    x = torch.randn(9, 3, 5, dtype=torch.float64, requires_grad=True)
    h0 = negative_state(2, 3, 7).requires_grad_()
    out, h_n = m(x, h0)
    seed = torch.Generator().manual_seed(2)
    g_out, g_h = torch.randn(out.shape, generator=seed, dtype=out.dtype), torch.randn(h_n.shape, generator=seed, dtype=out.dtype)
    got = torch.autograd.grad((out * g_out).sum() + (h_n * g_h).sum(), [x, h0, *m.parameters()])
    ref_out, ref_h = paper_stack(m, x, h0)
    want = torch.autograd.grad((ref_out * g_out).sum() + (ref_h * g_h).sum(), [x, h0, *m.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("candidate", ["g", "linear"])
def test_fused_gradcheck(candidate, monkeypatch):
    monkeypatch.setattr(mingru, "_TILE_BYTES", 2 * 2 * 4 * 8 * 3)  # tiles of 3 steps: 8 steps = 3 + 3 + 2
    torch.manual_seed(3)
    x = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: mingru.mingru_layer(*a, candidate=candidate, scan="fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h0, w, b))
    assert torch.autograd.gradcheck(lambda x, h0, w: fn(x, h0, w, None), (x, h0, w), fast_mode=True)  # bias=False


def test_log_scan_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = -torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mingru.mingru_layer(*a, scan="log"), (x, h0, w, b))


def test_second_backward_through_retained_graph():
    """The fused backward turns its buffer into dY in place; a second backward must rebuild it."""
    torch.manual_seed(5)
    m = MinGRU(4, 6).double()
    x = torch.randn(7, 2, 4, dtype=torch.float64)
    out, _ = m(x, negative_state(1, 2, 6))
    loss = (out ** 2).sum()
    first = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(m.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("scan", SCANS)
def test_calls_compose(scan):
    """One call over T == two calls carrying the state == T single steps."""
    torch.manual_seed(6)
    m = MinGRU(5, 8, num_layers=3, scan=scan).double()
    x = torch.randn(11, 2, 5, dtype=torch.float64)
    h0 = negative_state(3, 2, 8)
    out, h_n = m(x, h0)
    o1, h1 = m(x[:4], h0)
    o2, h2 = m(x[4:], h1)
    torch.testing.assert_close(torch.cat([o1, o2]), out)
    torch.testing.assert_close(h2, h_n)
    h, outs = h0, []
    for x_t in x:
        o, h = m.step(x_t, h)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs), out)
    torch.testing.assert_close(h, h_n)


def test_step_unbatched_and_float32():
    torch.manual_seed(7)
    m = MinGRU(3, 4, num_layers=2)
    x = torch.randn(5, 3)  # unbatched (T, I)
    out, h_n = m(x)
    h, outs = None, []
    for x_t in x:
        o, h = m.step(x_t, h)
        outs.append(o)
    assert h.shape == h_n.shape == (2, 4)
    torch.testing.assert_close(torch.stack(outs), out)
    torch.testing.assert_close(h, h_n)


@pytest.mark.parametrize("scan", SCANS)
def test_nan_and_inf_propagate_like_the_formula_loop(scan):
    torch.manual_seed(8)
    m = MinGRU(3, 5, scan=scan).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    x[3, 0, 1] = float("nan")  # sequence 0 turns NaN from step 3 on
    h0 = negative_state(1, 2, 5)
    h0[0, 1, 2] = float("inf")  # sequence 1, unit 2 stays +inf (z < 1 everywhere)
    h0[0, 1, 4] = -float("inf")
    out, h_n = m(x, h0)
    ref, _ = paper_stack(m, x, h0)
    assert torch.isnan(ref[3:, 0]).all() and not torch.isnan(ref[:3]).any()
    assert torch.isinf(ref[:, 1, 2]).all() and torch.isinf(ref[:, 1, 4]).all()
    torch.testing.assert_close(out, ref, equal_nan=True)
    torch.testing.assert_close(h_n[0], ref[-1], equal_nan=True)


@pytest.mark.parametrize("scan", ["fused", "log"])
def test_nan_gradients_like_the_formula_loop(scan):
    torch.manual_seed(17)
    m = MinGRU(3, 5, scan=scan).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    x[3, 0, 1] = float("nan")
    x.requires_grad_()
    h0 = negative_state(1, 2, 5).requires_grad_()
    g = torch.randn(6, 2, 5, dtype=torch.float64)
    got = torch.autograd.grad((m(x, h0)[0] * g).sum(), [x, h0, *m.parameters()])
    want = torch.autograd.grad((paper_stack(m, x, h0)[0] * g).sum(), [x, h0, *m.parameters()])
    assert torch.isnan(want[0][:4, 0]).all() and not torch.isnan(want[0][:, 1]).any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_g_and_log_g():
    v = torch.tensor([-30.0, -2.0, -1e-3, 0.0, 1e-3, 2.0, 30.0], dtype=torch.float64)
    want = torch.where(v >= 0, v + 0.5, torch.sigmoid(v))
    torch.testing.assert_close(mingru.g(v), want, rtol=0, atol=0)
    torch.testing.assert_close(mingru.log_g(v), torch.log(want))
    assert (mingru.g(v) > 0).all()
    assert torch.isnan(mingru.g(torch.tensor([float("nan")]))).all()


def test_layouts_match_time_major():
    torch.manual_seed(9)
    m = MinGRU(4, 6, num_layers=2).double()
    mb = MinGRU(4, 6, num_layers=2, batch_first=True).double()
    mb.load_state_dict(m.state_dict())
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    out, h_n = m(x)
    out_b, h_b = mb(x.transpose(0, 1))
    torch.testing.assert_close(out_b.transpose(0, 1), out)
    torch.testing.assert_close(h_b, h_n)
    out_u, h_u = m(x[:, 1])  # unbatched
    torch.testing.assert_close(out_u, out[:, 1])
    torch.testing.assert_close(h_u, h_n[:, 1])
    empty, h_e = m(x[:0], h_n)  # no steps: the state passes through
    assert empty.shape == (0, 3, 6)
    torch.testing.assert_close(h_e, h_n)


def test_bidirectional_is_forward_plus_reversed_pass():
    torch.manual_seed(10)
    m = MinGRU(4, 5, bidirectional=True).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    h0 = negative_state(2, 2, 5)
    out, h_n = m(x, h0)
    (w_f, b_f), (w_r, b_r) = m.all_weights
    fwd = paper_layer(x, h0[0], w_f, b_f, "g")
    rev = paper_layer(x.flip(0), h0[1], w_r, b_r, "g").flip(0)
    torch.testing.assert_close(out, torch.cat([fwd, rev], 2))
    torch.testing.assert_close(h_n, torch.stack([fwd[-1], rev[0]]))
    assert {n for n, _ in m.named_parameters()} == {"weight_ih_l0", "bias_ih_l0", "weight_ih_l0_reverse", "bias_ih_l0_reverse"}
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.step(x[0])


def test_dropout_only_between_layers_in_training():
    torch.manual_seed(11)
    m = MinGRU(4, 5, num_layers=2, dropout=0.5).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x)[0], paper_stack(m, x, torch.zeros(2, 2, 5, dtype=torch.float64))[0])
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])


def test_trace_returns_gates_of_every_step():
    torch.manual_seed(12)
    m = MinGRU(3, 4, num_layers=2, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)  # (B, T, I)
    h0 = negative_state(2, 2, 4)
    tr = m.trace(x, h0)
    assert tr.z.shape == tr.n.shape == tr.h.shape == (2, 6, 2, 4)  # (L, T, B, H)
    w, b = m.all_weights[0]
    torch.testing.assert_close(tr.z[0], torch.sigmoid(F.linear(x.transpose(0, 1), w, b)[..., :4]))
    out, h_n = m(x, h0)
    torch.testing.assert_close(tr.h[-1], out.transpose(0, 1))
    assert ((tr.z > 0) & (tr.z < 1)).all() and (tr.n > 0).all()


def test_bad_arguments_name_expected_and_got():
    with pytest.raises(ValueError, match="scan must be one of"):
        MinGRU(3, 4, scan="parallel")
    with pytest.raises(ValueError, match="candidate='g'"):
        MinGRU(3, 4, candidate="linear", scan="log")
    with pytest.raises(TypeError, match="hidden_size should be of type int"):
        MinGRU(3, 4.0)
    m = MinGRU(3, 4, num_layers=2)
    with pytest.raises(RuntimeError, match="Expected 3, got 5"):
        m(torch.randn(2, 1, 5))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(2, 1, 4\), got \[1, 1, 4\]"):
        m(torch.randn(2, 1, 3), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="does not match weight dtype"):
        m(torch.randn(2, 1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        m(torch.randn(2, 1, 1, 3))
    assert isinstance(grulab.MinGRU(3, 4), MinGRU)


# -- the paper's language-model block -------------------------------------------------


def random_state(m: MinGRUBlocks, batch: int):
    return tuple(torch.randn_like(s) for s in m.init_state(batch))


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("kernel", [1, 4])
def test_blocks_forward_equals_steps_and_split_calls(scan, kernel):
    """The conv window travels with the state: generation sees what training saw."""
    torch.manual_seed(13)
    m = MinGRUBlocks(7, 12, num_layers=2, conv_kernel=kernel, expansion=1.5, scan=scan).double().eval()
    x = torch.randn(9, 3, 7, dtype=torch.float64)
    state = random_state(m, 3)
    out, (h, conv) = m(x, state)
    assert out.shape == (9, 3, 12) and h.shape == (2, 3, 18) and conv.shape == (2, kernel - 1, 3, 12)
    o1, s1 = m(x[:2], state)  # shorter than the conv window
    o2, s2 = m(x[2:], s1)
    torch.testing.assert_close(torch.cat([o1, o2]), out)
    s, outs = state, []
    for x_t in x:
        o, s = m.step(x_t, s)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs), out)
    for a, b in zip(s, (h, conv)):
        torch.testing.assert_close(a, b)


def test_blocks_conv_is_causal_and_matches_conv1d():
    torch.manual_seed(14)
    conv = mingru.CausalConv(5, 3).double()
    x = torch.randn(8, 2, 5, dtype=torch.float64)
    y, window = conv(x, x.new_zeros(2, 2, 5))
    ref = F.conv1d(F.pad(x.permute(1, 2, 0), (2, 0)), conv.weight[:, None], conv.bias, groups=5)  # (B, D, T)
    torch.testing.assert_close(y, ref.permute(2, 0, 1))
    torch.testing.assert_close(window, x[-2:])
    x2 = x.clone()
    x2[5] += 1  # a change at step 5 moves nothing before it
    y2, _ = conv(x2, x.new_zeros(2, 2, 5))
    torch.testing.assert_close(y2[:5], y[:5], rtol=0, atol=0)
    assert not torch.allclose(y2[5], y[5])


def test_blocks_train_and_trace():
    torch.manual_seed(15)
    m = MinGRUBlocks(6, 8, num_layers=2, batch_first=True)
    x = torch.randn(3, 5, 6)  # (B, T, I)
    out, state = m(x)
    assert out.shape == (3, 5, 8)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    tr = m.trace(x)
    assert tr.z.shape == (2, 5, 3, 8)  # (L, T, B, H)
    with pytest.raises(RuntimeError, match="Expected state shapes"):
        m(x, (state[0][:1], state[1]))
    with pytest.raises(ValueError, match=r"expected a 3D input \(B, T, I\)"):
        m(x[0])


@pytest.mark.parametrize("candidate", ["g", "linear"])
def test_single_step_uses_only_basic_ops(candidate):
    """mingru_step is the form to export (ONNX): matmul, add, sub, mul, sigmoid (+ relu, clamp for g)."""
    import torch.fx

    gm = torch.fx.symbolic_trace(lambda x, h, w, b: mingru.mingru_step(x, h, w, b, candidate))
    ops = {getattr(n.target, "__name__", n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert ops <= {"matmul", "t", "add", "sub", "mul", "sigmoid", "relu", "clamp", "chunk", "getitem"}, ops
    torch.manual_seed(16)
    x, h, w, b = torch.randn(2, 3), torch.randn(2, 4), torch.randn(8, 3), torch.randn(8)
    z, h_new = gm(x, h, w, b)
    torch.testing.assert_close(h_new, paper_layer(x[None], h, w, b, candidate)[0])
