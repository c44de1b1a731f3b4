"""The character (or word) level language model of the notes.

tokens -> one-hot or embedding -> recurrent stack (RNN, GRU, LSTM, minGRU) -> linear -> logits

    logits, state = model(idx)          # idx (B, T) -> logits (B, T, V)
    logits, state = model(idx, state)   # carry the state on (sequential batches)

The kinds of recurrent stack are the entries of :data:`CELLS`; adding one there
is all it takes to train, compare, save and load it (``--cell`` reads it too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grulab.lm.config import COUNT, FRACTION, POSITIVE_INT, Config, option, up_to
from grulab.errors import ConfigError
from grulab.gru import GRU, IMPLS, resolve_impl
from grulab.mingru import MinGRU, MinGRUBlocks

State = Union[Tensor, tuple[Tensor, ...]]  # (L, B, H), (h, c) for the LSTM, (h, conv) for mingru-block


@dataclass(frozen=True)
class CellKind:
    """One kind of recurrent stack: how to build it and the shape of its state."""

    build: Callable[["ModelConfig", int, float], nn.Module]  # (config, input size, dropout between layers) -> module
    states: int = 1  # tensors in the state, each (L, B, H): 1 = h, 2 = the LSTM's (h, c); a module with
    # its own init_state(batch) (the minGRU block's (h, conv)) says instead
    d2l_init: bool = True  # --init d2l applies; False for stacks with norms, which N(0, 0.01²) weights would zero


def _rnn(c: "ModelConfig", input_size: int, dropout: float) -> nn.Module:
    return nn.RNN(input_size, c.hidden, c.layers, dropout=dropout)


def _gru(c: "ModelConfig", input_size: int, dropout: float) -> nn.Module:
    return GRU(input_size, c.hidden, c.layers, dropout=dropout, reset_after=c.reset_after, impl=c.impl)


def _lstm(c: "ModelConfig", input_size: int, dropout: float) -> nn.Module:
    return nn.LSTM(input_size, c.hidden, c.layers, dropout=dropout)


def _mingru(c: "ModelConfig", input_size: int, dropout: float) -> nn.Module:
    return MinGRU(input_size, c.hidden, c.layers, dropout=dropout)


def _mingru_block(c: "ModelConfig", input_size: int, dropout: float) -> nn.Module:
    # the paper's LM block: dropout on every residual branch, so even with one layer
    return MinGRUBlocks(input_size, c.hidden, c.layers, dropout=c.dropout)


#: The recurrent stacks, by --cell name. Each module maps (T, B, I) and a state to (T, B, H) and a state.
CELLS: dict[str, CellKind] = {
    "rnn": CellKind(_rnn),  # torch.nn.RNN, tanh
    "gru": CellKind(_gru),  # grulab.GRU
    "lstm": CellKind(_lstm, states=2),  # torch.nn.LSTM
    "mingru": CellKind(_mingru),  # grulab.MinGRU (Feng et al. 2024): gates read only the input
    "mingru-block": CellKind(_mingru_block, d2l_init=False),  # the paper's LM block: norm, conv, minGRU, MLP
}


def _init_d2l(model: "LanguageModel") -> None:
    """The notes' get_params: weights from N(0, 0.01²), zero biases, one bias per gate.

    torch's recurrent layers have two biases per gate (b_ih + b_hh); the hidden-side
    ones are held at zero (no gradient), so b_ih is the notes' b_r, b_z, b_h.
    """
    for name, p in model.named_parameters():
        if "bias" in name:
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, 0.01)
        if name.startswith("rnn.bias_hh"):
            p.requires_grad_(False)


#: Parameter initialisations, by --init name.
INITS: dict[str, Callable[["LanguageModel"], None]] = {
    "torch": lambda model: None,  # torch.nn's own: U(−1/√H, 1/√H)
    "d2l": _init_d2l,
}


@dataclass
class ModelArgs(Config):
    """The model's fields. ModelConfig adds the vocabulary size; TrainConfig adds the run's fields.

    The size caps refuse a damaged config.json before it asks for terabytes: 65,536 hidden
    units are already 50 GB of float32 weights per GRU layer."""

    cell: str = option("gru", "recurrent cell", choices=CELLS)
    hidden: int = option(384, "hidden units per layer", rule=up_to(POSITIVE_INT, 65536))
    layers: int = option(1, "recurrent layers", rule=up_to(POSITIVE_INT, 256))
    dropout: float = option(0.0, "dropout between layers and before the output layer", rule=FRACTION)
    embed: int = option(64, "embedding width; 0 = one-hot input as in the notes", rule=up_to(COUNT, 65536))
    reset_after: bool = option(
        True, "GRU: reset gate after the recurrent matrix product (PyTorch, cuDNN); False = the notes' form",
        flag="--reset-before", flag_help="GRU: the d2l PyTorch notes' form, the reset gate before the matrix "
        "product: H̃ = tanh(X W_xh + (R ⊙ H) W_hh + b_h); off: PyTorch's reset-after form, "
        "H̃ = tanh(X W_xh + b_xh + R ⊙ (H W_hh + b_hh))")
    impl: str = option("auto", "GRU kernel: auto (the one measured fastest for the shape on this machine; "
                       "`grulab kernels --shape` explains it), fused, torch (torch.nn.GRU's, reset-after only) "
                       "or reference (the notes' equations)", choices=IMPLS)
    init: str = option("torch", "parameter init: torch (U(−1/√H, 1/√H)) or d2l (the notes: N(0, 0.01²) weights, "
                       "zero biases, one bias per gate)", choices=INITS)

    def check(self) -> None:
        super().check()
        if self.cell == "gru" and self.impl == "torch" and not self.reset_after:
            raise ConfigError("impl", "auto, fused or reference for the reset-before GRU "
                              "(torch's kernels compute only the reset-after form)", self.impl)
        if self.init == "d2l" and not CELLS[self.cell].d2l_init:
            raise ConfigError("init", f"torch for --cell {self.cell} (the notes' N(0, 0.01²) weights would all but "
                              "zero its LayerNorms)", self.init)

    def describe(self) -> str:
        """'gru 1×384', with the reset-before form named."""
        form = " (reset before)" if self.cell == "gru" and not self.reset_after else ""
        return f"{self.cell}{form} {self.layers}×{self.hidden}"


@dataclass
class ModelConfig(ModelArgs):
    """Everything that rebuilds a model: checkpoints store it as config.json's "model"."""

    vocab_size: int = option(help="number of tokens, <unk> included", rule=up_to(POSITIVE_INT, 2**24))


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed) if c.embed else None
        input_size = c.embed or c.vocab_size
        self.rnn = CELLS[c.cell].build(c, input_size, c.dropout if c.layers > 1 else 0.0)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)
        INITS[c.init](self)

    def inputs(self, idx: Tensor) -> Tensor:
        """Token ids (T, B) -> input vectors (T, B, I): an embedding, or one-hot as in the notes."""
        if self.embedding is not None:
            return self.embedding(idx)  # (T, B, E)
        return F.one_hot(idx, self.config.vocab_size).to(self.head.weight.dtype)  # (T, B, V)

    def forward(self, idx: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """idx (B, T) int64 -> logits (B, T, V) and the final state."""
        x = self.inputs(idx.t())  # (T, B, I): the recurrent layers are time-major
        out, state = self.rnn(x, state)  # (T, B, H)
        logits = self.head(self.drop(out))  # (T, B, V)
        return logits.transpose(0, 1), state  # (B, T, V)

    def init_state(self, batch_size: int) -> State:
        """The zero state before the first token: (L, B, H), or the tuple the cell keeps."""
        if hasattr(self.rnn, "init_state"):  # MinGRU, MinGRUBlocks
            return self.rnn.init_state(batch_size)
        w = self.head.weight
        states = [w.new_zeros(self.config.layers, batch_size, self.config.hidden)  # each (L, B, H)
                  for _ in range(CELLS[self.config.cell].states)]
        return states[0] if len(states) == 1 else tuple(states)

    @torch.no_grad()
    def step(self, idx: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """One token per sequence, for generation: idx (B,) -> logits (B, V), new state.

        The GRU takes the fused single-step path (no autograd graph, no per-step
        module overhead) when :mod:`grulab.kernels.fused` is there.
        """
        if state is None:
            state = self.init_state(idx.shape[0])
        x = self.inputs(idx[None])[0]  # (B, I)
        rnn = self.rnn
        if isinstance(rnn, GRU) and resolve_impl(rnn.impl, rnn.reset_after, x.device) == "fused":
            from grulab.kernels import fused

            new = []
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(rnn.all_weights):
                x = fused.gru_step(x, state[layer], w_ih, w_hh, b_ih, b_hh, rnn.reset_after)  # (B, H)
                new.append(x)
            state = torch.stack(new)  # (L, B, H)
            out = x
        elif isinstance(rnn, (MinGRU, MinGRUBlocks)):
            out, state = rnn.step(x, state)  # (B, H)
        else:
            out, state = rnn(x[None], state)  # (1, B, H)
            out = out[0]
        return self.head(out), state  # (B, V)


def detach_state(state: Optional[State]) -> Optional[State]:
    """Cut the graph between sequential batches, keeping the values."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
