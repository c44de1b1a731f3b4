"""ONNX export, built from the weights: no tracing, so the graph is right by construction.

    grulab.export_onnx(model, "model.onnx")        # a LanguageModel, or a GRU/LSTM/RNN module

Each recurrent layer becomes one ONNX ``GRU``, ``LSTM`` or ``RNN`` operator whose
weights are torch's, reordered to ONNX's gate order. For the GRU (torch rows
r|z|n, ONNX rows z|r|h)::

    W = [W_iz | W_ir | W_in]      (D, 3H, I)    from weight_ih_l{k}[_reverse]
    R = [W_hz | W_hr | W_hn]      (D, 3H, H)    from weight_hh_l{k}[_reverse]
    B = [b_iz|b_ir|b_in | b_hz|b_hr|b_hn]   (D, 6H)

ONNX's candidate state with ``linear_before_reset=1`` is
``tanh(x W_h + Wb_h + r ⊙ (h R_h + Rb_h))``, grulab's ``reset_after=True``
(PyTorch/cuDNN); with ``linear_before_reset=0`` it is
``tanh(x W_h + (r ⊙ h) R_h + Rb_h + Wb_h)``, grulab's ``reset_after=False``
(the notes), where ``b_hn`` is added after the product, as in
:func:`grulab.reference.gru_step`. The update ``h' = (1 − z) ⊙ n + z ⊙ h`` is
the same in both. (PyTorch's dynamo exporter writes ``linear_before_reset=0``
for nn.GRU, which is the other cell.)

Graphs (batch and sequence length are dynamic):

* LanguageModel: ``tokens`` int64 (B, T) and ``state`` (L, B, H) -> ``logits``
  (B, T, V) and ``new_state`` (L, B, H); an LSTM adds ``cell`` -> ``new_cell``.
* a GRU/LSTM/RNN module: ``input`` (T, B, I) ((B, T, I) with ``batch_first``)
  and ``state`` (L·D, B, H) -> ``output`` (T, B, D·H) and ``new_state``.

The state inputs are optional: left out, they default to zeros (each is also an
initializer of batch 1, broadcast to the batch). Dropout is left out (inference).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from grulab.lm.data import Vocab
from grulab.gru import GRU

DEFAULT_OPSET = 17
MIN_OPSET = 14  # GRU/LSTM/RNN-14, Reshape-14

# torch's gate blocks -> ONNX's, as indices into the torch blocks
_GATE_ORDER = {
    "GRU": [1, 0, 2],  # torch r|z|n -> ONNX z|r|h
    "LSTM": [0, 3, 1, 2],  # torch i|f|g|o -> ONNX i|o|f|c
    "RNN": [0],
}


def _recurrent_op(rnn: nn.Module) -> tuple[str, dict]:
    """The ONNX operator for a recurrent module and its cell-specific attributes; ValueError if none.

    Exact types only: a subclass may compute something else (a minGRU built on grulab.GRU, say).
    """
    kind = type(rnn)
    if kind is GRU:
        return "GRU", {"linear_before_reset": int(rnn.reset_after)}
    if kind is nn.GRU:
        return "GRU", {"linear_before_reset": 1}  # torch.nn.GRU is the reset-after cell
    if kind is nn.LSTM:
        if rnn.proj_size:
            raise ValueError(f"export_onnx: an LSTM with proj_size={rnn.proj_size} has no ONNX LSTM form; "
                             f"export a model with proj_size=0")
        return "LSTM", {}
    if kind is nn.RNN:
        act = {"RNN_TANH": "Tanh", "RNN_RELU": "Relu"}[rnn.mode]
        return "RNN", {"activations": [act] * (2 if rnn.bidirectional else 1)}
    raise ValueError(
        f"export_onnx: cannot express {type(rnn).__name__} in ONNX: the exporter knows grulab.GRU, "
        f"torch.nn.GRU, torch.nn.LSTM and torch.nn.RNN (ONNX GRU/LSTM/RNN operators)"
    )


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, base: str, value) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs: Optional[list[str]] = None,
           **attrs) -> Union[str, list[str]]:
        outputs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def _weights(rnn: nn.Module, layer: int, op: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (D, G·H, I), R (D, G·H, H), B (D, 2·G·H) of one layer, in ONNX's gate order."""
    order = _GATE_ORDER[op]
    directions = ["", "_reverse"] if rnn.bidirectional else [""]

    def blocks(t: torch.Tensor) -> np.ndarray:
        chunks = t.detach().cpu().numpy().reshape(len(order), rnn.hidden_size, *t.shape[1:])
        return np.concatenate([chunks[i] for i in order])  # (G·H, ...) reordered

    W, R, B = [], [], []
    for s in directions:
        W.append(blocks(getattr(rnn, f"weight_ih_l{layer}{s}")))
        R.append(blocks(getattr(rnn, f"weight_hh_l{layer}{s}")))
        if rnn.bias:  # Wb | Rb
            B.append(np.concatenate([blocks(getattr(rnn, f"bias_ih_l{layer}{s}")),
                                     blocks(getattr(rnn, f"bias_hh_l{layer}{s}"))]))
        else:
            B.append(np.zeros(2 * len(order) * rnn.hidden_size, np.float32))
    return np.stack(W), np.stack(R), np.stack(B)


def _state_input(g: _Graph, name: str, rows: int, hidden: int, batch: str, inputs: list, outputs: list,
                 out_name: str) -> str:
    """An optional (rows, B, H) state input: zeros of batch 1 by default, broadcast to the batch."""
    g.initializers.append(numpy_helper.from_array(np.zeros((rows, 1, hidden), np.float32), name))
    inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, "batch", hidden]))
    outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [rows, "batch", hidden]))
    shape = g.op("Concat", [g.const("rows", np.array([rows], np.int64)), batch,
                            g.const("hidden", np.array([hidden], np.int64))], axis=0)
    return g.op("Expand", [name, shape])  # (rows, B, H)


def _stack(g: _Graph, rnn: nn.Module, x: str, batch: str, inputs: list, outputs: list) -> str:
    """The recurrent layers on x (T, B, I) -> (T, B, D·H); adds the state inputs and outputs."""
    op, attrs = _recurrent_op(rnn)
    D, H, L = (2 if rnn.bidirectional else 1), rnn.hidden_size, rnn.num_layers
    states = {"state": "new_state"} if op != "LSTM" else {"state": "new_state", "cell": "new_cell"}
    initial = {s: _state_input(g, s, L * D, H, batch, inputs, outputs, out) for s, out in states.items()}
    finals: dict[str, list[str]] = {s: [] for s in states}
    direction = "bidirectional" if D == 2 else "forward"
    for layer in range(L):
        W, R, B = _weights(rnn, layer, op)
        rows = [g.const("start", np.array([layer * D], np.int64)), g.const("end", np.array([(layer + 1) * D], np.int64)),
                g.const("axis", np.array([0], np.int64))]
        h0 = {s: g.op("Slice", [initial[s], *rows]) for s in states}  # (D, B, H)
        op_inputs = [x, g.const(f"W_l{layer}", W), g.const(f"R_l{layer}", R), g.const(f"B_l{layer}", B), "",
                     h0["state"]]
        if op == "LSTM":
            op_inputs.append(h0["cell"])
        n_out = 3 if op == "LSTM" else 2
        y, *last = g.op(op, op_inputs, n_out=n_out, hidden_size=H, direction=direction, **attrs)
        for s, t in zip(states, last):
            finals[s].append(t)  # (D, B, H)
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3])  # (T, D, B, H) -> (T, B, D, H)
        x = g.op("Reshape", [y, g.const("shape", np.array([0, 0, D * H], np.int64))])  # (T, B, D·H)
    for s, out in states.items():
        g.op("Concat", finals[s], outputs=[out], axis=0)  # (L·D, B, H), torch's h_n order
    return x


def _batch_dim(g: _Graph, tensor: str, axis: int) -> str:
    """Shape(tensor)[axis] as a 1-element int64 tensor."""
    return g.op("Gather", [g.op("Shape", [tensor]), g.const("axis", np.array([axis], np.int64))], axis=0)


def _language_model_graph(g: _Graph, model: nn.Module, inputs: list, outputs: list) -> None:
    c = model.config
    inputs.append(helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]))
    batch = _batch_dim(g, "tokens", 0)
    idx = g.op("Transpose", ["tokens"], perm=[1, 0])  # (T, B): the recurrent layers are time-major
    if model.embedding is not None:
        x = g.op("Gather", [g.const("embedding", model.embedding.weight.detach().cpu().numpy()), idx], axis=0)
    else:
        x = g.op("OneHot", [idx, g.const("depth", np.array(c.vocab_size, np.int64)),
                            g.const("off_on", np.array([0.0, 1.0], np.float32))], axis=-1)  # (T, B, V)
    out = _stack(g, model.rnn, x, batch, inputs, outputs)  # (T, B, H)
    out = g.op("Transpose", [out], perm=[1, 0, 2])  # (B, T, H)
    head_w = model.head.weight.detach().cpu().numpy().T.copy()  # (H, V)
    logits = g.op("MatMul", [out, g.const("head_weight", head_w)])
    g.op("Add", [logits, g.const("head_bias", model.head.bias.detach().cpu().numpy())], outputs=["logits"])
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size]))


def _recurrent_graph(g: _Graph, rnn: nn.Module, inputs: list, outputs: list) -> None:
    D = 2 if rnn.bidirectional else 1
    dims = ["batch", "seq", rnn.input_size] if rnn.batch_first else ["seq", "batch", rnn.input_size]
    inputs.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, dims))
    x = g.op("Transpose", ["input"], perm=[1, 0, 2]) if rnn.batch_first else "input"  # (T, B, I)
    out = _stack(g, rnn, x, _batch_dim(g, "input", 0 if rnn.batch_first else 1), inputs, outputs)
    g.op("Transpose" if rnn.batch_first else "Identity", [out], outputs=["output"],
         **({"perm": [1, 0, 2]} if rnn.batch_first else {}))
    outputs.insert(0, helper.make_tensor_value_info("output", TensorProto.FLOAT, [*dims[:2], D * rnn.hidden_size]))


def _check_exportable(model: nn.Module, opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"export_onnx: opset should be an int, got {type(opset).__name__}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"export_onnx: opset must be in {MIN_OPSET}..{newest} (this onnx {onnx.__version__}), got {opset}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        got = ", ".join(sorted(str(d) for d in dtypes)) or "no parameters"
        raise ValueError(f"export_onnx: the model must be float32 (ONNX Runtime's recurrent operators are), "
                         f"got {got}; call model.float() first")


def build_onnx(model: nn.Module, opset: int = DEFAULT_OPSET, vocab: Optional[Vocab] = None) -> onnx.ModelProto:
    """The checked ONNX model for ``model`` (see :func:`export_onnx`), not yet written."""
    from grulab.lm.model import LanguageModel  # here, not at the top: a GRU or LSTM alone needs no language model

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model should be an nn.Module, got {type(model).__name__}")
    _check_exportable(model, opset)
    g, inputs, outputs = _Graph(), [], []
    if isinstance(model, LanguageModel):
        _recurrent_op(model.rnn)  # refuse an unknown cell before building anything
        _language_model_graph(g, model, inputs, outputs)
        meta = {"grulab_kind": "language_model", "grulab_config": json.dumps(model.config.to_dict())}
        if vocab is not None:
            if len(vocab) != model.config.vocab_size:
                raise ValueError(f"export_onnx: the vocabulary has {len(vocab)} tokens, the model "
                                 f"{model.config.vocab_size}; pass the vocabulary the model was trained with")
            meta["grulab_vocab"] = json.dumps(vocab.to_dict(), ensure_ascii=False)
    else:
        _recurrent_op(model)
        _recurrent_graph(g, model, inputs, outputs)
        meta = {"grulab_kind": "recurrent"}
    graph = helper.make_graph(g.nodes, f"grulab_{type(model).__name__}", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    # the oldest IR that has the opset: runtimes older than this onnx package still load the file
    proto = helper.make_model(graph, producer_name="grulab", opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], opset: int = DEFAULT_OPSET,
                vocab: Optional[Vocab] = None) -> Path:
    """Write ``model`` as an ONNX file and return its path.

    ``model`` is a :class:`grulab.lm.model.LanguageModel` (one-hot or embedding,
    GRU/LSTM/RNN stack, linear head) or a recurrent module: :class:`grulab.GRU`
    (either ``reset_after``), :class:`torch.nn.GRU`, :class:`torch.nn.LSTM`
    (without ``proj_size``) or :class:`torch.nn.RNN`, any number of layers,
    one or two directions. It must be float32. See the module docs for the
    graph's inputs and outputs. The graph is checked with ``onnx.checker``;
    anything it cannot express raises ValueError naming it. A language model's
    ``vocab`` (:class:`grulab.lm.data.Vocab`), if given, is stored in the file's
    metadata, so the file alone can generate text.
    """
    proto = build_onnx(model, opset, vocab)
    path = Path(path)
    onnx.save(proto, str(path))
    return path
