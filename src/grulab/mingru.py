r"""minGRU, the GRU stripped down by Feng et al. (2024), "Were RNNs All We Needed?" (arXiv 2410.01201).

The gate and the candidate read only the input, never the previous state::

    z_t  = σ(x_t W_z^T + b_z)                      update gate        (B, H)
    h̃_t  = x_t W_n^T + b_n        (candidate="linear")                (B, H)
    h̃_t  = g(x_t W_n^T + b_n)     (candidate="g", the paper's default)
    h_t  = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t          new state          (B, H)

with ``g(v) = v + 0.5`` for v ≥ 0 and ``σ(v)`` otherwise: continuous, positive,
so that the log-space scan of the paper can take ``log h̃``. Mind the convention:
here z_t ≈ 1 *writes* the candidate, while grulab.GRU's z ≈ 1 *keeps* the state.

Since z and h̃ do not depend on h, a whole layer is one GEMM over all T steps,
``Y = X [W_z; W_n]^T + [b_z; b_n]`` (T, B, 2H), plus the linear recurrence
``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a = 1 − z``, ``b = z ⊙ h̃``. Three ways to
run that recurrence are here (``scan=``):

* ``"fused"`` (default): a hand-written forward and backward
  (``torch.autograd.Function``). The forward is one ``addcmul`` per step; the
  backward of a linear recurrence is the reverse linear recurrence
  ``dL/dh_{t-1} = g_{t-1} + a_t ⊙ dL/dh_t`` (g: the gradient from the output),
  again one op per step, and the gate gradients are then elementwise::

      dh̃_t = dL/dh_t ⊙ z_t                     (⊙ g'(·) for candidate="g")
      dz_t = dL/dh_t ⊙ (h̃_t − h_{t-1})   →   dY_z = dz_t ⊙ z_t ⊙ (1 − z_t)

  All elementwise work is done in place, a tile of steps at a time, in the
  (T, B, 2H) buffer of Y, which becomes dY in the backward: besides the output,
  no tensor as large as the sequence is allocated. Exact for any h_0 (the same
  floating-point operations as the formula loop) and any sign of h̃.
* ``"log"``: Heinsen's log-space scan, the paper's parallel form,
  ``h = exp(a* + logcumsumexp(log b − a*))`` with ``a* = cumsum(log a)``; needs
  h̃ > 0, so only with ``candidate="g"``. The h_0 term is added outside the logs,
  ``+ exp(a*) ⊙ h_0``, so any h_0 works, negative too.
* ``"loop"``: the formula loop, one step at a time through autograd: the
  readable yardstick (and what :meth:`MinGRU.step` runs for one step).

Which is fastest on a CPU is measured in ``benchmarks/bench_mingru.py`` (results
in ``benchmarks/results.md``).

The language-model block of the paper (norm → causal depthwise conv → minGRU →
MLP, with residuals) is :class:`MinGRUBlocks`.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from grulab.gru import check_int, check_stack

__all__ = ["MinGRU", "MinGRUBlocks", "MinGRUTrace", "g", "log_g", "mingru_step", "mingru_layer"]

CANDIDATES = ("g", "linear")
SCANS = ("fused", "log", "loop")

# Steps per tile in the fused scan: the in-place elementwise passes work on
# (TILE_STEPS, B, 2H) slices, which stay in cache between consecutive passes.
_TILE_BYTES = 1 << 20


def g(v: Tensor) -> Tensor:
    """The paper's positive activation: v + 0.5 for v ≥ 0, σ(v) otherwise.

    Written as ``relu(v) + σ(min(v, 0))`` (equal value everywhere: σ(0) = 0.5), so
    an exporter sees only relu, clamp, sigmoid and add.
    """
    return torch.relu(v) + torch.sigmoid(torch.clamp(v, max=0))


def log_g(v: Tensor) -> Tensor:
    """log g(v), computed stably: log(v + 0.5) for v ≥ 0, −softplus(−v) otherwise."""
    return torch.where(v >= 0, torch.log(torch.relu(v) + 0.5), -F.softplus(-v))


def _split(y: Tensor, candidate: str) -> tuple[Tensor, Tensor]:
    """Pre-activations (..., 2H) -> (z, h̃), each (..., H)."""
    y_z, y_n = y.chunk(2, -1)
    return torch.sigmoid(y_z), (g(y_n) if candidate == "g" else y_n)


def mingru_step(x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], candidate: str = "g") -> tuple[Tensor, Tensor]:
    """One minGRU step: x (B, I), h (B, H) -> (z (B, H), new h (B, H)).

    Only matmul, add, mul, sigmoid (and relu/clamp for g): the form to export.
    """
    y = x @ weight.t()  # (B, 2H)
    if bias is not None:
        y = y + bias
    z, n = _split(y, candidate)  # (B, H) each
    return z, (1 - z) * h + z * n  # h_t = (1 − z) ⊙ h_{t-1} + z ⊙ h̃


def _loop_layer(x, h0, weight, bias, candidate) -> tuple[Tensor, Tensor]:
    """The formula loop through autograd: x (T, B, I), h0 (B, H) -> (out (T, B, H), h_T)."""
    z, n = _split(F.linear(x, weight, bias), candidate)  # (T, B, H) each
    h, outs = h0, []
    for z_t, n_t in zip(z, n):
        h = (1 - z_t) * h + z_t * n_t  # (B, H)
        outs.append(h)
    if not outs:
        return x.new_zeros(0, *h0.shape), h0
    return torch.stack(outs), h


def _log_layer(x, h0, weight, bias) -> tuple[Tensor, Tensor]:
    """Heinsen's log-space scan (the paper's parallel form, candidate="g"), any h0."""
    y_z, y_n = F.linear(x, weight, bias).chunk(2, -1)  # (T, B, H) each
    log_a = -F.softplus(y_z)  # log(1 − z)
    log_b = -F.softplus(-y_z) + log_g(y_n)  # log(z ⊙ h̃)
    a_star = torch.cumsum(log_a, 0)  # (T, B, H) log Π a
    out = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, 0)) + torch.exp(a_star) * h0  # (T, B, H)
    return out, (out[-1] if len(out) else h0)


class _FusedLayer(torch.autograd.Function):
    """One minGRU layer, one direction, with the backward written by hand (see the module docs)."""

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, weight: Tensor, bias: Optional[Tensor], use_g: bool):
        T, B, I = x.shape
        H = h0.shape[1]
        x2 = x.reshape(T * B, I)  # (T*B, I)
        y = _project(x2, weight, bias).view(T, B, 2 * H)  # pre-activations, [z | h̃] once activated
        out = x.new_empty(T, B, H)  # (T, B, H)
        outs = out.unbind(0)
        C = _tile_steps(B * H * 2 * x.element_size(), T)
        a = x.new_empty(C, B, H)  # (C, B, H) 1 − z of the tile's steps
        a_t = a.unbind(0)
        h = h0
        for t0 in range(0, T, C):
            t1 = min(t0 + C, T)
            z, n = _activate(y[t0:t1], use_g)  # (c, B, H) views into y
            torch.sub(1, z, out=a[: t1 - t0])
            torch.mul(z, n, out=out[t0:t1])  # b = z ⊙ h̃
            for t in range(t0, t1):
                h = torch.addcmul(outs[t], a_t[t - t0], h, out=outs[t])  # h_t = b_t + a_t ⊙ h_{t-1}
        h_n = out[-1].clone() if T else h0.clone()
        ctx.save_for_backward(x2, h0, weight, bias, out)
        # y is turned into dY in place by the backward; kept off save_for_backward's
        # version check so that a second backward (retain_graph) can recompute it.
        ctx.y, ctx.y_spent, ctx.use_g = y, False, use_g
        return out, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Optional[Tensor], g_hn: Optional[Tensor]):
        x2, h0, weight, bias, out = ctx.saved_tensors
        T, B, H = out.shape
        y = ctx.y
        if ctx.y_spent:  # a second backward through the same graph: rebuild [z | h̃]
            y = _project(x2, weight, bias).view(T, B, 2 * H)
            _activate(y, ctx.use_g)
        ctx.y_spent = True
        # dL/dh_t = g_t + a_{t+1} ⊙ dL/dh_{t+1}; c carries a_{t+1} ⊙ dL/dh_{t+1} between tiles.
        c = g_hn if g_hn is not None else h0.new_zeros(B, H)  # (B, H)
        if g_out is None:
            g_out = out.new_zeros(()).expand(T, B, H)
        C = _tile_steps(B * H * 2 * out.element_size(), T)
        a, G, d = (out.new_empty(C, B, H) for _ in range(3))  # (C, B, H) tiles
        a_t, G_t = a.unbind(0), G.unbind(0)
        g_t = g_out.unbind(0)
        # y holds [z | h̃] (T, B, 2H); each tile is overwritten with [dY_z | dY_n] once used.
        for t1 in range(T, 0, -C):
            t0 = max(t1 - C, 0)
            k = t1 - t0
            z, n = y[t0:t1, :, :H], y[t0:t1, :, H:]  # (k, B, H) views
            a_k, G_k, d_k = a[:k], G[:k], d[:k]
            torch.sub(1, z, out=a_k)
            torch.add(g_t[t1 - 1], c, out=G_t[k - 1])
            for i in range(k - 2, -1, -1):
                torch.addcmul(g_t[t0 + i], a_t[i + 1], G_t[i + 1], out=G_t[i])  # G = dL/dh_t
            c = a_t[0] * G_t[0]  # a_{t0} ⊙ dL/dh_{t0}: into step t0 − 1, or dL/dh_0
            torch.sub(n[1:], out[t0 : t1 - 1], out=d_k[1:])  # d = h̃_t − h_{t-1}
            torch.sub(n[0], out[t0 - 1] if t0 else h0, out=d_k[0])
            if ctx.use_g:
                G_k.mul_(z)  # G ⊙ z
                torch.mul(G_k, d_k, out=z).mul_(a_k)  # dY_z = G ⊙ z ⊙ d ⊙ (1 − z)
                ge = n >= 0.5  # g'(v) = 1 where v ≥ 0 (h̃ ≥ 0.5), else σ'(v) = h̃ (1 − h̃)
                n.addcmul_(n, n, value=-1).masked_fill_(ge, 1.0).mul_(G_k)  # dY_n = G ⊙ z ⊙ g'
            else:
                torch.mul(G_k, z, out=n)  # dY_n = G ⊙ z
                torch.mul(n, d_k, out=z).mul_(a_k)  # dY_z = G ⊙ z ⊙ d ⊙ (1 − z)
        dy2 = y.view(T * B, 2 * H)  # (T*B, 2H)
        dx = (dy2 @ weight).view(T, B, x2.shape[1]) if ctx.needs_input_grad[0] else None  # (T, B, I)
        dw = dy2.t() @ x2 if ctx.needs_input_grad[2] else None  # (2H, I)
        db = dy2.sum(0) if ctx.needs_input_grad[3] else None  # (2H,)
        return dx, c, dw, db, None


def _project(x2: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x2 (N, I) -> x2 W^T + b (N, 2H), one GEMM."""
    return torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()


def _activate(y: Tensor, use_g: bool) -> tuple[Tensor, Tensor]:
    """Pre-activations (c, B, 2H) -> [z | h̃] in place; returns the two (c, B, H) halves."""
    z, n = y.chunk(2, -1)
    z.sigmoid_()
    if use_g:  # h̃ = relu(v) + σ(min(v, 0)), as g() computes it
        s = torch.clamp(n, max=0).sigmoid_()
        n.relu_().add_(s)
    return z, n


def _tile_steps(bytes_per_step: int, T: int) -> int:
    return max(1, min(T, _TILE_BYTES // max(1, bytes_per_step)))


def mingru_layer(
    x: Tensor, h0: Tensor, weight: Tensor, bias: Optional[Tensor], candidate: str = "g", scan: str = "fused"
) -> tuple[Tensor, Tensor]:
    """One layer, one direction: x (T, B, I), h0 (B, H) -> (output (T, B, H), h_T (B, H))."""
    if scan == "fused":
        return _FusedLayer.apply(x, h0, weight, bias, candidate == "g")
    if scan == "log":
        return _log_layer(x, h0, weight, bias)
    return _loop_layer(x, h0, weight, bias, candidate)


class MinGRUTrace(NamedTuple):
    """Everything a MinGRU computes over a sequence, each (num_layers·D, T, B, H)."""

    z: Tensor  # update gate: 1 writes the candidate, 0 keeps the state
    n: Tensor  # candidate state h̃
    h: Tensor  # state after each step


class MinGRU(nn.Module):
    r"""A multi-layer minGRU (Feng et al. 2024), called like :class:`torch.nn.GRU`.

    For each element of the input sequence each layer computes

    .. math::
        z_t = \sigma(W_z x_t + b_z)                                        \\
        \tilde h_t = g(W_n x_t + b_n) \quad\text{or}\quad W_n x_t + b_n    \\
        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t

    with :math:`g(v) = v + 0.5` for :math:`v \ge 0` and :math:`\sigma(v)` otherwise.
    Unlike the GRU, :math:`z_t` and :math:`\tilde h_t` do not read
    :math:`h_{t-1}`: a layer is one GEMM over the whole sequence and a linear
    recurrence (see :mod:`grulab.mingru` for how it is run). Note the
    convention: :math:`z_t = 1` writes the candidate (grulab.GRU's z keeps the state).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, device, dtype: as in :class:`torch.nn.GRU`.
        candidate: ``"g"`` (the paper's positive candidate, default) or ``"linear"``.
        scan: ``"fused"`` (default), ``"log"`` (Heinsen's log-space scan; needs
            ``candidate="g"``) or ``"loop"`` (the formula loop through autograd).

    Inputs ``input, h_0`` and outputs ``output, h_n`` have the shapes of
    :class:`torch.nn.GRU`: input (L, N, H_in), (N, L, H_in) with ``batch_first``,
    or (L, H_in) unbatched; h_0 and h_n (D·num_layers, N, H_out), zeros when
    h_0 is omitted. :meth:`step` runs one time step (generation),
    :meth:`trace` returns z, h̃ and h of every step (visualisation).

    Parameters: ``weight_ih_l{k}`` (2H, I) = W_z | W_n and ``bias_ih_l{k}`` (2H,)
    = b_z | b_n, with a ``_reverse`` suffix for the backward direction, each
    initialised from U(−1/√H, 1/√H) as in torch.nn.GRU. There are no recurrent weights.

    Equivalent to (one layer, one direction, candidate="g")::

        h = h_0
        for x_t in input:
            z = sigmoid(x_t @ W_z.T + b_z)
            n = g(x_t @ W_n.T + b_n)
            h = (1 - z) * h + z * n
            output.append(h)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        candidate: str = "g",
        scan: str = "fused",
    ) -> None:
        super().__init__()
        check_stack(input_size, hidden_size, num_layers, dropout)
        if candidate not in CANDIDATES:
            raise ValueError(f"candidate must be one of {', '.join(map(repr, CANDIDATES))}, got {candidate!r}")
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(map(repr, SCANS))}, got {scan!r}")
        if scan == "log" and candidate != "g":
            raise ValueError(
                "scan='log' takes the log of the candidate, which must be positive: "
                "use candidate='g', or scan='fused' for candidate='linear'"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.candidate = candidate
        self.scan = scan
        factory = {"device": device, "dtype": dtype}
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                layer_input = input_size if layer == 0 else hidden_size * self.num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                names = ["weight_ih" + suffix]
                setattr(self, names[0], nn.Parameter(torch.empty(2 * hidden_size, layer_input, **factory)))  # W_z|W_n
                if bias:
                    names.append("bias_ih" + suffix)
                    setattr(self, names[1], nn.Parameter(torch.empty(2 * hidden_size, **factory)))  # b_z|b_n
                self._all_weights.append(names)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """U(−1/√H, 1/√H) for every weight and bias, as torch.nn.GRU."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def all_weights(self) -> list[tuple[Tensor, Optional[Tensor]]]:
        """(weight, bias or None) per layer and direction, in h_0's order."""
        return [(getattr(self, names[0]), getattr(self, names[1]) if self.bias else None) for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.candidate != "g":
            s += f", candidate={self.candidate!r}"
        if self.scan != "fused":
            s += f", scan={self.scan!r}"
        return s

    def init_state(self, batch_size: int) -> Tensor:
        """Zeros (D·num_layers, B, H): the state before the first token."""
        w = self.weight_ih_l0
        return w.new_zeros(self.num_layers * self.num_directions, batch_size, self.hidden_size)

    # -- checks -------------------------------------------------------------------
    def _check_input(self, input, hx: Optional[Tensor], dims: tuple[int, int], what: str) -> bool:
        """Validate ``input`` (batched dims[1]-D or unbatched dims[0]-D) and ``hx``; True if batched."""
        if not isinstance(input, Tensor):
            raise TypeError(f"MinGRU {what} must be a Tensor, got {type(input).__name__}")
        if input.dim() not in dims:
            raise ValueError(f"MinGRU{'.' + what if what != 'input' else ''}: Expected input to be "
                             f"{dims[0]}D or {dims[1]}D, got {input.dim()}D instead")
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            raise ValueError(
                f"MinGRU input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})"
            )
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}"
            )
        batched = input.dim() == dims[1]
        if hx is None:
            return batched
        if not isinstance(hx, Tensor):
            raise TypeError(f"MinGRU hx must be a Tensor, got {type(hx).__name__}")
        L = self.num_layers * self.num_directions
        if batched:
            batch = input.size(0) if (self.batch_first and what == "input") else input.size(-2)
            expected = (L, batch, self.hidden_size)
        else:
            expected = (L, self.hidden_size)
        if tuple(hx.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")
        if hx.dtype != weight.dtype:
            raise ValueError(f"MinGRU hx dtype ({hx.dtype}) does not match weight dtype ({weight.dtype})")
        return batched

    # -- forward ------------------------------------------------------------------
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """input (T, B, I) [or (B, T, I) batch_first, or (T, I)] -> (output (T, B, D·H), h_n (D·L, B, H))."""
        batched = self._check_input(input, hx, (2, 3), "input")
        if not batched:
            input, hx = input.unsqueeze(1), (hx.unsqueeze(1) if hx is not None else None)  # (T, 1, I)
        elif self.batch_first:
            input = input.transpose(0, 1)  # (T, B, I)
        output, h_n = self._layers(input, hx, trace=None)
        if not batched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), h_n

    def _layers(self, x: Tensor, hx: Optional[Tensor], trace: Optional[list]) -> tuple[Tensor, Tensor]:
        """Time-major x (T, B, I) through every layer and direction; appends (z, n, h) to ``trace`` if given."""
        if hx is None:
            hx = self.init_state(x.size(1)).to(x.device)  # (D·L, B, H)
        h_n = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                weight, bias = self.all_weights[k]
                x_dir = x if direction == 0 else x.flip(0)  # the reverse pass reads time backwards
                if trace is None:
                    out, h_last = mingru_layer(x_dir, hx[k], weight, bias, self.candidate, self.scan)
                else:
                    out, h_last = self._trace_layer(x_dir, hx[k], weight, bias, trace)
                outputs.append(out if direction == 0 else out.flip(0))  # (T, B, H)
                h_n.append(h_last)  # (B, H)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # (T, B, D·H)
        return x, torch.stack(h_n)  # (T, B, D·H), (D·L, B, H)

    def _trace_layer(self, x, h0, weight, bias, trace: list) -> tuple[Tensor, Tensor]:
        """The formula loop, keeping z, h̃ and h of every step."""
        zs, ns, hs = [], [], []
        h = h0
        for x_t in x:  # (B, I)
            y = F.linear(x_t, weight, bias)  # (B, 2H)
            z, n = _split(y, self.candidate)
            h = (1 - z) * h + z * n
            zs.append(z), ns.append(n), hs.append(h)
        empty = x.new_zeros(0, *h0.shape)
        stacked = [torch.stack(v) if v else empty for v in (zs, ns, hs)]  # (T, B, H) each
        trace.append(stacked)
        return stacked[2], h

    @torch.no_grad()
    def trace(self, input: Tensor, hx: Optional[Tensor] = None) -> MinGRUTrace:
        """z, h̃ and h of every step and layer, each (D·L, T, B, H), for visualisation.

        Takes what :meth:`forward` takes (batch_first and unbatched too); the
        per-step values come from the formula loop, the same as :meth:`step` computes.
        """
        batched = self._check_input(input, hx, (2, 3), "input")
        if not batched:
            input, hx = input.unsqueeze(1), (hx.unsqueeze(1) if hx is not None else None)
        elif self.batch_first:
            input = input.transpose(0, 1)
        records: list = []
        self._layers(input, hx, trace=records)
        z, n, h = (torch.stack([r[i] for r in records]) for i in range(3))  # (D·L, T, B, H)
        if not batched:
            z, n, h = z[:, :, 0], n[:, :, 0], h[:, :, 0]  # (D·L, T, H)
        return MinGRUTrace(z, n, h)

    def step(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One time step, for generation: input (B, I) or (I,), hx (L, B, H) -> (output (B, H), h (L, B, H)).

        The same arithmetic as one step of :meth:`forward` (matmul, add, mul,
        sigmoid only: see :func:`mingru_step`). One direction only.
        """
        if self.bidirectional:
            raise RuntimeError("MinGRU.step runs forward in time; a bidirectional MinGRU needs the whole sequence")
        batched = self._check_input(input, hx, (1, 2), "step")
        x = input if batched else input.unsqueeze(0)  # (B, I)
        if hx is None:
            hx = self.init_state(x.size(0)).to(x.device)
        elif not batched:
            hx = hx.unsqueeze(1)
        new = []
        for layer, (weight, bias) in enumerate(self.all_weights):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x = mingru_step(x, hx[layer], weight, bias, self.candidate)[1]  # (B, H)
            new.append(x)
        h = torch.stack(new)  # (L, B, H)
        return (x, h) if batched else (x.squeeze(0), h.squeeze(1))


# ---------------------------------------------------------------------------
# The paper's language-model block
# ---------------------------------------------------------------------------


class CausalConv(nn.Module):
    r"""A causal depthwise convolution over time that carries its window across calls.

    ``y_t = b + Σ_j w[:, j] ⊙ x_{t−K+1+j}`` per channel (an ``nn.Conv1d(D, D, K,
    groups=D)`` with K − 1 steps of left padding), where the K − 1 inputs before
    the first one come from ``window`` (zeros at the start of a text). Returning
    the last K − 1 inputs as the new window makes one call over T steps equal
    any split of it into shorter calls, down to one step at a time.
    """

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None) -> None:
        super().__init__()
        check_int("conv_kernel", kernel_size, 1)
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size, device=device, dtype=dtype))  # (D, K)
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))  # (D,)
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for fan_in = K
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, window: Tensor) -> tuple[Tensor, Tensor]:
        """x (T, B, D), window (K−1, B, D) -> (y (T, B, D), new window (K−1, B, D))."""
        T, K = x.size(0), self.kernel_size
        padded = torch.cat([window, x]) if K > 1 else x  # (K−1+T, B, D)
        y = torch.addcmul(self.bias, padded[0:T], self.weight[:, 0])  # (T, B, D)
        for j in range(1, K):
            y = y.addcmul(padded[j : j + T], self.weight[:, j])
        return y, padded[padded.size(0) - (K - 1) :]


class MinGRUBlock(nn.Module):
    """One block of the paper's language model (pre-norm, two residual branches)::

        x = x + W_o minGRU(conv(LayerNorm(x)))      W_o only when the state is wider than x
        x = x + MLP(LayerNorm(x))                   Linear(D, m·D) → GELU → Linear(m·D, D)
    """

    def __init__(self, dim: int, inner: int, conv_kernel: int, mlp_mult: int, dropout: float,
                 candidate: str, scan: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv = CausalConv(dim, conv_kernel)
        self.rnn = MinGRU(dim, inner, candidate=candidate, scan=scan)
        self.proj = nn.Linear(inner, dim, bias=False) if inner != dim else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_mult * dim), nn.GELU(), nn.Linear(mlp_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, h: Tensor, window: Tensor, trace: Optional[list] = None):
        """x (T, B, D), h (B, H), window (K−1, B, D) -> (x, h, window), same shapes."""
        u, window = self.conv(self.norm1(x), window)  # (T, B, D)
        if trace is not None:
            trace.append(self.rnn.trace(u, h[None]))
        v, h_n = self.rnn(u, h[None])  # (T, B, H), (1, B, H)
        x = x + self.drop(self.proj(v))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, h_n[0], window


class MinGRUBlocks(nn.Module):
    r"""A stack of the paper's language-model blocks (Feng et al. 2024, with the block
    their first author describes: norm → causal depthwise conv → minGRU → MLP, with residuals).

    input (T, B, I) → Linear(I, D) if I ≠ D → blocks → LayerNorm → output (T, B, D),
    where D = ``hidden_size`` is the width of the residual stream and each
    minGRU has ``round(expansion · D)`` units (projected back to D).

    The state carries everything a block remembers: ``(h, conv)`` with h
    (num_layers, B, H) the minGRU states and conv (num_layers, K − 1, B, D) the
    last K − 1 inputs of each causal convolution. :meth:`forward` over T steps
    equals T calls of :meth:`step` and any split into shorter forward calls.

    Args:
        input_size: features per input step.
        hidden_size: D, the residual width (the output's feature size).
        num_layers: number of blocks.
        dropout: on each residual branch.
        batch_first: input and output (B, T, ·) instead of (T, B, ·).
        conv_kernel: K, the causal convolution's width (K = 1: no look-back).
        expansion: minGRU units per residual unit.
        mlp_mult: the MLP's hidden width per residual unit.
        candidate, scan: as in :class:`MinGRU`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        batch_first: bool = False,
        *,
        conv_kernel: int = 4,
        expansion: float = 1.0,
        mlp_mult: int = 4,
        candidate: str = "g",
        scan: str = "fused",
    ) -> None:
        super().__init__()
        check_int("input_size", input_size, 1)
        check_int("hidden_size", hidden_size, 1)
        check_int("num_layers", num_layers, 1)
        check_int("mlp_mult", mlp_mult, 1)
        if not isinstance(expansion, numbers.Real) or isinstance(expansion, bool) or expansion <= 0:
            raise ValueError(f"expansion must be a number > 0, got {expansion!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first = batch_first
        self.conv_kernel = conv_kernel
        self.inner_size = max(1, round(expansion * hidden_size))
        self.proj_in = nn.Linear(input_size, hidden_size) if input_size != hidden_size else nn.Identity()
        self.blocks = nn.ModuleList(
            MinGRUBlock(hidden_size, self.inner_size, conv_kernel, mlp_mult, dropout, candidate, scan)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def init_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Zeros: (h (L, B, H), conv (L, K−1, B, D))."""
        w = self.norm.weight
        h = w.new_zeros(self.num_layers, batch_size, self.inner_size)
        conv = w.new_zeros(self.num_layers, self.conv_kernel - 1, batch_size, self.hidden_size)
        return h, conv

    def _check(self, input, state, step: bool) -> None:
        dims = 2 if step else 3
        if not isinstance(input, Tensor):
            raise TypeError(f"MinGRUBlocks input must be a Tensor, got {type(input).__name__}")
        if input.dim() != dims:
            shape = "(B, I)" if step else ("(B, T, I)" if self.batch_first else "(T, B, I)")
            raise ValueError(f"MinGRUBlocks{'.step' if step else ''}: expected a {dims}D input {shape}, got {input.dim()}D")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}")
        if state is None:
            return
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise TypeError("MinGRUBlocks state must be a tuple (h, conv), as init_state returns")
        batch = input.size(0) if (step or self.batch_first) else input.size(1)
        expected = [tuple(s.shape) for s in self.init_state(batch)]
        got = [tuple(s.shape) for s in state]
        if got != expected:
            raise RuntimeError(f"Expected state shapes (h, conv) {expected}, got {got}")

    def forward(self, input: Tensor, state: Optional[tuple[Tensor, Tensor]] = None, _trace: Optional[list] = None):
        """input (T, B, I) -> (output (T, B, D), state (h, conv)); (B, T, ·) with batch_first."""
        self._check(input, state, step=False)
        x = input.transpose(0, 1) if self.batch_first else input  # (T, B, I)
        h, conv = state if state is not None else self.init_state(x.size(1))
        x = self.proj_in(x)  # (T, B, D)
        hs, convs = [], []
        for k, block in enumerate(self.blocks):
            x, h_k, conv_k = block(x, h[k], conv[k], _trace)
            hs.append(h_k), convs.append(conv_k)
        x = self.norm(x)
        return (x.transpose(0, 1) if self.batch_first else x), (torch.stack(hs), torch.stack(convs))

    def step(self, input: Tensor, state: Optional[tuple[Tensor, Tensor]] = None):
        """One step, for generation: input (B, I) -> (output (B, D), state)."""
        self._check(input, state, step=True)
        out, state = self.forward(input.unsqueeze(1) if self.batch_first else input.unsqueeze(0), state)
        return (out[:, 0] if self.batch_first else out[0]), state

    @torch.no_grad()
    def trace(self, input: Tensor, state: Optional[tuple[Tensor, Tensor]] = None) -> MinGRUTrace:
        """z, h̃ and h of each block's minGRU at every step, each (L, T, B, H), batch-first or not."""
        records: list = []
        self.forward(input, state, _trace=records)
        return MinGRUTrace(*(torch.cat([r[i] for r in records]) for i in range(3)))
