"""The GRU of the course notes, written out equation by equation.

This module is the executable form of the notes: one line of code per
equation, with the shapes written beside it. It is the slow, readable
implementation behind ``grulab.GRU(impl="reference")`` and the yardstick the
fused kernel is tested against.

Notation (B = batch, I = input features, H = hidden units)::

    R_t  = σ(X_t W_xr + H_{t-1} W_hr + b_r)                 reset gate
    Z_t  = σ(X_t W_xz + H_{t-1} W_hz + b_z)                 update gate
    H̃_t  = tanh(X_t W_xh + (R_t ⊙ H_{t-1}) W_hh + b_h)      candidate (notes, Cho et al. 2014)
    H_t  = Z_t ⊙ H_{t-1} + (1 − Z_t) ⊙ H̃_t                 new state

PyTorch and cuDNN compute the candidate with the reset gate applied *after*
the matrix product (``reset_after=True``)::

    H̃_t  = tanh(X_t W_xh + b_xh + R_t ⊙ (H_{t-1} W_hh + b_hh))

Weights are stored as torch.nn.GRU stores them: ``w_ih`` is (3H, I), the rows
stacked in gate order r | z | n, so ``X_t W_xr`` above is ``x @ W_ir.T``.

Some texts (one of the notes among them) write the update the other way round,
``H_t = (1 − Z'_t) ⊙ H_{t-1} + Z'_t ⊙ H̃_t``. It is the same cell with
``Z' = 1 − Z``; since ``1 − σ(a) = σ(−a)``, negating the update gate's weights and
biases maps one convention onto the other.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class GRUStep(NamedTuple):
    """Everything one time step computes, each (B, H)."""

    r: Tensor  # reset gate R_t
    z: Tensor  # update gate Z_t
    n: Tensor  # candidate state H̃_t
    h: Tensor  # new hidden state H_t


def gru_step(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    reset_after: bool = True,
) -> GRUStep:
    """One GRU time step: x (B, I), h (B, H) -> GRUStep(r, z, n, h), each (B, H)."""
    W_ir, W_iz, W_in = w_ih.chunk(3, 0)  # each (H, I)
    W_hr, W_hz, W_hn = w_hh.chunk(3, 0)  # each (H, H)
    b_ir, b_iz, b_in = b_ih.chunk(3) if b_ih is not None else (None, None, None)  # each (H,)
    b_hr, b_hz, b_hn = b_hh.chunk(3) if b_hh is not None else (None, None, None)  # each (H,)

    # R_t = σ(X_t W_xr + H_{t-1} W_hr + b_r)
    r = torch.sigmoid(F.linear(x, W_ir, b_ir) + F.linear(h, W_hr, b_hr))  # (B, H)
    # Z_t = σ(X_t W_xz + H_{t-1} W_hz + b_z)
    z = torch.sigmoid(F.linear(x, W_iz, b_iz) + F.linear(h, W_hz, b_hz))  # (B, H)
    if reset_after:
        # H̃_t = tanh(X_t W_xh + b_xh + R_t ⊙ (H_{t-1} W_hh + b_hh))   PyTorch / cuDNN
        n = torch.tanh(F.linear(x, W_in, b_in) + r * F.linear(h, W_hn, b_hn))  # (B, H)
    else:
        # H̃_t = tanh(X_t W_xh + (R_t ⊙ H_{t-1}) W_hh + b_h)            the notes
        n = torch.tanh(F.linear(x, W_in, b_in) + F.linear(r * h, W_hn, b_hn))  # (B, H)
    # H_t = Z_t ⊙ H_{t-1} + (1 − Z_t) ⊙ H̃_t
    h_new = z * h + (1 - z) * n  # (B, H)
    return GRUStep(r, z, n, h_new)


def gru_layer(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    reset_after: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run one layer, one direction, over a sequence.

    x (T, B, I), h (B, H) -> (output (T, B, H), h_T (B, H)).
    """
    outputs = []
    for x_t in x:  # x_t (B, I)
        h = gru_step(x_t, h, w_ih, w_hh, b_ih, b_hh, reset_after).h  # (B, H)
        outputs.append(h)
    if not outputs:
        return x.new_zeros(0, h.shape[0], h.shape[1]), h
    return torch.stack(outputs), h  # (T, B, H), (B, H)


def trace(gru, x: Tensor, h0: Optional[Tensor] = None) -> list[GRUStep]:
    """Run a GRU stack over ``x`` step by step with :func:`gru_step` and keep every gate.

    ``gru`` is a one-directional :class:`grulab.GRU` or :class:`torch.nn.GRU` (whose
    weights are used as they are); ``x`` is (T, B, I), time-major; ``h0`` is
    (L, B, H), zeros when omitted. Returns one :class:`GRUStep` per layer whose
    fields are the layer's ``r``, ``z``, ``n`` and ``h`` over time, each (T, B, H):
    ``h`` is the layer's output, so the last layer's ``h`` is what
    ``gru(x, h0)[0]`` returns (without dropout between layers: eval mode).

    Equivalent to::

        for layer in range(L):
            h = h0[layer]
            for t in range(T):
                r[t], z[t], n[t], h = gru_step(x[t], h, *weights[layer], reset_after)
            x = stack of h over t        # the next layer's input
    """
    if gru.bidirectional:
        raise ValueError("trace: expected a one-directional GRU, got bidirectional=True")
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"trace: expected x (T, B, I) with T >= 1, got shape {tuple(x.shape)}")
    reset_after = getattr(gru, "reset_after", True)  # torch.nn.GRU computes the reset-after form
    layers = []
    for k, weights in enumerate(gru.all_weights):
        w_ih, w_hh, b_ih, b_hh = weights if gru.bias else (*weights, None, None)
        h = h0[k] if h0 is not None else x.new_zeros(x.shape[1], gru.hidden_size)  # (B, H)
        steps = []
        for x_t in x:  # x_t (B, I)
            steps.append(gru_step(x_t, h, w_ih, w_hh, b_ih, b_hh, reset_after))
            h = steps[-1].h  # (B, H)
        layers.append(GRUStep(*(torch.stack(over_time) for over_time in zip(*steps))))  # each (T, B, H)
        x = layers[-1].h  # (T, B, H): the next layer's input
    return layers
