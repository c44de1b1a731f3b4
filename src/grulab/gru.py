"""grulab.GRU and grulab.GRUCell: drop-ins for torch.nn.GRU and torch.nn.GRUCell.

Same constructor, same forward, same parameter names, shapes, gate order and
initialisation as torch.nn, so ``load_state_dict`` works both ways. Two things
are added:

* ``reset_after`` picks where the reset gate is applied. ``True`` (the default)
  is what PyTorch and cuDNN compute; ``False`` is the form of the course notes
  and of Cho et al. (2014). Both use the same parameters.
* ``impl`` picks who does the arithmetic:

  - ``"reference"``: :mod:`grulab.reference`, the notes' equations line by line;
  - ``"torch"``: torch's own GRU kernels (``reset_after=True`` only);
  - ``"fused"``: :mod:`grulab.kernels.fused`, a hand-written forward and BPTT;
  - ``"auto"``: the fastest correct one for the call, as :mod:`grulab.kernels` decides: on the CPU
    the kernel measured fastest for the call's shape (:mod:`grulab.kernels.autotune`: a native
    loop, fused-torch or torch's own), torch/cuDNN on CUDA when ``reset_after=True``.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from grulab import kernels, reference

IMPLS = ("auto", "reference", "torch", "fused")

_LayerFn = Callable[..., tuple[Tensor, Tensor]]


def check_int(name: str, value, minimum: int) -> None:
    """torch.nn's check of an integer size (TypeError, ValueError); MinGRU uses it too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        what = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")


def check_stack(input_size, hidden_size, num_layers, dropout) -> None:
    """The size and dropout checks of torch.nn.GRU's constructor (also MinGRU's)."""
    check_int("input_size", input_size, 1)
    check_int("hidden_size", hidden_size, 1)
    check_int("num_layers", num_layers, 1)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Number)
        or not 0 <= dropout <= 1
    ):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the "
            f"probability of an element being zeroed, got {dropout!r}"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            stacklevel=3,
        )


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


def _check_no_projection(kwargs: dict, cls: str) -> None:
    """torch.nn.GRU's answer to ``proj_size`` (ValueError); any other unknown keyword a TypeError."""
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    if kwargs:
        raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {next(iter(kwargs))!r}")


def _check_options(reset_after, impl) -> None:
    if not isinstance(reset_after, bool):
        raise TypeError(f"reset_after should be of type bool, got: {type(reset_after).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "torch" and not reset_after:
        raise ValueError(
            "impl='torch' computes only the reset-after GRU of PyTorch/cuDNN; "
            "for reset_after=False use impl='fused', 'reference' or 'auto'"
        )


def resolve_impl(impl: str, reset_after: bool, device: torch.device) -> str:
    """The implementation ``impl="auto"`` stands for on ``device`` (decided by grulab.kernels)."""
    if impl != "auto":
        return impl
    return kernels.BY_NAME[kernels.select_name("auto", device.type, torch.float32, reset_after)].impl


def _layer_fn(impl: str) -> _LayerFn:
    if impl == "reference":
        return reference.gru_layer
    from grulab.kernels import fused

    return fused.gru_layer


class GRU(nn.Module):
    r"""A multi-layer gated recurrent unit (GRU), a drop-in for :class:`torch.nn.GRU`.

    For each element of the input sequence each layer computes

    .. math::
        r_t = \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})            \\
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})            \\
        n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn}))  \quad\text{(reset\_after=True)} \\
        n_t = \tanh(W_{in} x_t + b_{in} + W_{hn} (r_t \odot h_{t-1}) + b_{hn})  \quad\text{(reset\_after=False)} \\
        h_t = z_t \odot h_{t-1} + (1 - z_t) \odot n_t

    :math:`r_t` is the reset gate R, :math:`z_t` the update gate Z and
    :math:`n_t` the candidate state H̃ of the notes. Some texts write the update
    as :math:`h_t = (1 - z'_t) \odot h_{t-1} + z'_t \odot n_t`; that is this
    cell with :math:`z' = 1 - z`, i.e. with the update gate's weights and biases
    negated (since :math:`1 - \sigma(a) = \sigma(-a)`).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, device, dtype: as in :class:`torch.nn.GRU`.
        reset_after: apply the reset gate after the recurrent matrix product
            (PyTorch/cuDNN, the default) or before it (the notes, Cho et al. 2014).
        impl: ``"auto"``, ``"reference"``, ``"torch"`` or ``"fused"`` (see the module docs).

    Inputs: ``input, h_0``; outputs: ``output, h_n``, with the shapes of
    :class:`torch.nn.GRU`: input (L, N, H_in) or (N, L, H_in) with
    ``batch_first`` or (L, H_in) unbatched, or a
    :class:`~torch.nn.utils.rnn.PackedSequence` of variable-length sequences
    (then the output is packed too); h_0 and h_n (D·num_layers, N, H_out).

    Parameters are named ``weight_ih_l{k}`` (3H, I) = W_ir|W_iz|W_in,
    ``weight_hh_l{k}`` (3H, H) = W_hr|W_hz|W_hn, ``bias_ih_l{k}``, ``bias_hh_l{k}``,
    with a ``_reverse`` suffix for the backward direction, each initialised
    from U(−1/√H, 1/√H).

    Equivalent to (one layer, one direction, ``reset_after=True``)::

        h = h_0
        for x_t in input:
            r = sigmoid(x_t @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
            z = sigmoid(x_t @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
            n = tanh(x_t @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))
            h = z * h + (1 - z) * n
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
        reset_after: bool = True,
        impl: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__()
        _check_no_projection(kwargs, "GRU")
        check_stack(input_size, hidden_size, num_layers, dropout)
        _check_bool("batch_first", batch_first)
        _check_bool("bias", bias)
        _check_options(reset_after, impl)
        self.mode = "GRU"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        self.reset_after = reset_after
        self.impl = impl

        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input = input_size if layer == 0 else hidden_size * num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {
                    "weight_ih": (3 * hidden_size, layer_input),  # W_ir|W_iz|W_in
                    "weight_hh": (3 * hidden_size, hidden_size),  # W_hr|W_hz|W_hn
                }
                if bias:
                    shapes["bias_ih"] = (3 * hidden_size,)  # b_ir|b_iz|b_in
                    shapes["bias_hh"] = (3 * hidden_size,)  # b_hr|b_hz|b_hn
                names = []
                for kind, shape in shapes.items():
                    name = kind + suffix
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    # -- torch.nn.RNNBase compatibility -------------------------------------------
    def reset_parameters(self) -> None:
        """U(−1/√H, 1/√H) for every weight and bias, as torch.nn.GRU."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op, kept so code written for torch.nn.GRU runs unchanged."""

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
        if self.reset_after is not True:
            s += f", reset_after={self.reset_after}"
        if self.impl != "auto":
            s += f", impl={self.impl!r}"
        return s

    # -- forward ------------------------------------------------------------------
    def _check_forward_args(
        self, input: Tensor, hx: Optional[Tensor], batched: bool, batch: Optional[int] = None
    ) -> None:
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            raise ValueError(
                f"GRU input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})"
            )
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}"
            )
        if hx is None:
            return
        if not batched and hx.dim() != 2:
            raise RuntimeError(
                f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
            )
        if batched and hx.dim() != 3:
            raise RuntimeError(
                f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
            )
        num_directions = 2 if self.bidirectional else 1
        if batch is None and batched:
            batch = input.size(0 if self.batch_first else 1)
        expected = (self.num_layers * num_directions, batch, self.hidden_size)
        if not batched:
            expected = (self.num_layers * num_directions, self.hidden_size)
        if tuple(hx.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(f"GRU input must be a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        self._check_forward_args(input, hx, batched)
        if not batched:
            input = input.unsqueeze(1)  # (T, 1, I)
            hx = hx.unsqueeze(1) if hx is not None else None
        elif self.batch_first:
            input = input.transpose(0, 1)  # (T, B, I)
        if input.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")  # torch's words

        output, h_n = self._run(input, hx, self._kernel(input, hx))

        if not batched:
            return output.squeeze(1), h_n.squeeze(1)
        if self.batch_first:
            output = output.transpose(0, 1)  # (B, T, D*H)
        return output, h_n

    def _forward_packed(self, packed: PackedSequence, hx: Optional[Tensor]) -> tuple[PackedSequence, Tensor]:
        """Sequences of different lengths, as torch.nn.GRU takes them: each state stops at its
        sequence's end and never reads padding. hx and h_n are in the caller's batch order."""
        batch = int(packed.batch_sizes[0])
        self._check_forward_args(packed.data, hx, True, batch)
        if hx is None:
            hx = packed.data.new_zeros(self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)
        impl = resolve_impl(self.impl, self.reset_after, packed.data.device)
        sorted_idx = packed.sorted_indices
        if impl == "torch":
            hx_sorted = hx if sorted_idx is None else hx.index_select(1, sorted_idx)
            data, h_n = torch.gru(packed.data, packed.batch_sizes, hx_sorted, self._flat_weights, self.bias,
                                  self.num_layers, self.dropout, self.training, self.bidirectional)
            if packed.unsorted_indices is not None:
                h_n = h_n.index_select(1, packed.unsorted_indices)
            return PackedSequence(data, packed.batch_sizes, sorted_idx, packed.unsorted_indices), h_n
        # Run the stack once per group of equal-length sequences, on exactly their steps.
        padded, lengths = pad_packed_sequence(packed)  # (T, B, I) in the caller's order, (B,)
        layer_fn = _layer_fn(impl)
        outputs, states, order = [], [], []
        for length in lengths.unique().tolist():
            idx = (lengths == length).nonzero().squeeze(1).to(padded.device)  # (b,)
            out, h = self._forward_layers(padded[:length, idx], hx[:, idx], layer_fn)  # (len, b, D*H)
            outputs.append(F.pad(out, (0, 0, 0, 0, 0, padded.size(0) - length)))  # (T, b, D*H)
            states.append(h)  # (L*D, b, H)
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        output = torch.cat(outputs, 1)[:, inverse]  # (T, B, D*H), the caller's order
        h_n = torch.cat(states, 1)[:, inverse]  # (L*D, B, H)
        if sorted_idx is not None:
            output = output[:, sorted_idx]  # the packed layout is sorted by length
        data = torch.cat([output[t, :n] for t, n in enumerate(packed.batch_sizes.tolist())])
        return PackedSequence(data, packed.batch_sizes, sorted_idx, packed.unsorted_indices), h_n

    def _kernel(self, input: Tensor, hx: Optional[Tensor]) -> str:
        """Who runs this call: "torch", "reference", "fused", or a fused kernel's name.

        ``impl="auto"`` on the CPU is measured per call signature (:mod:`grulab.kernels.autotune`)."""
        if self.impl == "auto" and input.device.type == "cpu" and not torch.compiler.is_compiling():
            from grulab.kernels import autotune

            return autotune.choose(self, input, hx, self._run)
        return resolve_impl(self.impl, self.reset_after, input.device)

    def _run(self, input: Tensor, hx: Optional[Tensor], kernel: str) -> tuple[Tensor, Tensor]:
        """The stack on input (T, B, I) with ``kernel`` (as :meth:`_kernel` names it)."""
        if kernel == "torch":
            return self._forward_torch(input, hx)
        if kernel in ("reference", "fused"):
            return self._forward_layers(input, hx, _layer_fn(kernel))
        from grulab.kernels import fused

        return self._forward_layers(input, hx, functools.partial(fused.gru_layer, backend=kernel))

    def _initial_state(self, input: Tensor) -> Tensor:
        num_directions = 2 if self.bidirectional else 1
        return input.new_zeros(self.num_layers * num_directions, input.size(1), self.hidden_size)

    def _forward_torch(self, input: Tensor, hx: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if hx is None:
            hx = self._initial_state(input)
        return torch.gru(
            input, hx, self._flat_weights, self.bias, self.num_layers,
            self.dropout, self.training, self.bidirectional, False,
        )

    def _forward_layers(
        self, input: Tensor, hx: Optional[Tensor], layer_fn: _LayerFn
    ) -> tuple[Tensor, Tensor]:
        """Layers bottom to top; in each, one pass forward and one reversed."""
        if hx is None:
            hx = self._initial_state(input)  # (L*D, B, H)
        num_directions = 2 if self.bidirectional else 1
        weights = self.all_weights
        x = input  # (T, B, I)
        h_n = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                w_ih, w_hh, *biases = weights[k]
                b_ih, b_hh = biases if self.bias else (None, None)
                x_dir = x if direction == 0 else x.flip(0)  # the reverse pass reads time backwards
                out, h_last = layer_fn(x_dir, hx[k], w_ih, w_hh, b_ih, b_hh, self.reset_after)
                outputs.append(out if direction == 0 else out.flip(0))  # (T, B, H)
                h_n.append(h_last)  # (B, H)
            x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)  # (T, B, D*H)
        return x, torch.stack(h_n)  # (T, B, D*H), (L*D, B, H)


class GRUCell(nn.Module):
    r"""A gated recurrent unit cell, a drop-in for :class:`torch.nn.GRUCell`.

    Computes one step of :class:`GRU` (see there for the equations):
    ``h' = GRUCell(input, hx)`` with input (N, I) or (I,) and hx (N, H) or (H,),
    zeros when omitted. Parameters ``weight_ih`` (3H, I), ``weight_hh`` (3H, H),
    ``bias_ih``, ``bias_hh`` (3H,), gate order r|z|n, init U(−1/√H, 1/√H).

    Args:
        input_size, hidden_size, bias, device, dtype: as in :class:`torch.nn.GRUCell`.
        reset_after: as in :class:`GRU`.
        impl: ``"auto"``, ``"reference"``, ``"torch"`` or ``"fused"``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        check_int("input_size", input_size, 0)  # torch.nn.GRUCell takes 0 (an empty state or input)
        check_int("hidden_size", hidden_size, 0)  # (torch.nn.GRUCell does not check bias's type)
        _check_options(reset_after, impl)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.reset_after = reset_after
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.reset_after is not True:
            s += f", reset_after={self.reset_after}"
        if self.impl != "auto":
            s += f", impl={self.impl!r}"
        return s

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"GRUCell input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)  # (1, I)
        if hx is None:
            hx = input.new_zeros(input.size(0), self.hidden_size)  # (B, H)
        elif not batched:
            hx = hx.unsqueeze(0)
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        if input.size(0) != hx.size(0):
            raise RuntimeError(
                f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}"
            )
        if hx.size(1) != self.hidden_size:
            raise RuntimeError(
                f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {self.hidden_size}"
            )
        if input.dtype != self.weight_ih.dtype or hx.dtype != self.weight_ih.dtype:
            # torch.nn.GRUCell's matrix product raises a RuntimeError here: same type, our words
            raise RuntimeError(
                f"GRUCell input dtype ({input.dtype}) and hidden dtype ({hx.dtype}) must match "
                f"weight dtype ({self.weight_ih.dtype}). Convert input: input.to({self.weight_ih.dtype}), "
                f"or convert model: model.to({input.dtype})"
            )
        impl = resolve_impl(self.impl, self.reset_after, input.device)
        args = (input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if impl == "torch":
            h = torch.gru_cell(*args)
        elif impl == "reference":
            h = reference.gru_step(*args, self.reset_after).h
        else:
            from grulab.kernels import fused

            h = fused.gru_step(*args, self.reset_after)  # differentiable; fastest under no_grad
        return h if batched else h.squeeze(0)
