"""The character (or word) level language model of the notes.

tokens -> one-hot or embedding -> recurrent stack (GRU, LSTM or RNN) -> linear -> logits

    logits, state = model(idx)          # idx (B, T) -> logits (B, T, V)
    logits, state = model(idx, state)   # carry the state on (sequential batches)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gru import GRU, resolve_impl

CELLS = ("gru", "lstm", "rnn")

State = Union[Tensor, tuple[Tensor, Tensor]]  # (L, B, H), or (h, c) for the LSTM


@dataclass
class ModelConfig:
    vocab_size: int  # number of tokens, <unk> included
    cell: str = "gru"  # recurrent cell: gru (grulab.GRU), lstm or rnn (torch.nn)
    hidden: int = 256  # hidden units per layer
    layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout between layers and before the output layer
    embed: int = 0  # embedding width; 0 feeds one-hot vectors, as the notes do
    reset_after: bool = True  # GRU only: reset gate after the matmul (PyTorch) or before (notes)
    impl: str = "auto"  # GRU only: auto, fused, torch or reference (grulab.GRU's impl)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "hidden", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.embed, bool) or not isinstance(self.embed, int) or self.embed < 0:
            raise ValueError(f"embed must be an integer >= 0 (0 = one-hot), got {self.embed!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed) if c.embed else None
        input_size = c.embed or c.vocab_size
        rnn_dropout = c.dropout if c.layers > 1 else 0.0
        if c.cell == "gru":
            self.rnn = GRU(input_size, c.hidden, c.layers, dropout=rnn_dropout, reset_after=c.reset_after,
                           impl=c.impl)
        elif c.cell == "lstm":
            self.rnn = nn.LSTM(input_size, c.hidden, c.layers, dropout=rnn_dropout)
        else:
            self.rnn = nn.RNN(input_size, c.hidden, c.layers, dropout=rnn_dropout)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)

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
        w = self.head.weight
        h = w.new_zeros(self.config.layers, batch_size, self.config.hidden)  # (L, B, H)
        return (h, h.clone()) if self.config.cell == "lstm" else h

    @torch.no_grad()
    def step(self, idx: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """One token per sequence, for generation: idx (B,) -> logits (B, V), new state.

        The GRU takes the fused single-step path (no autograd graph, no per-step
        module overhead) when :mod:`grulab.fused` is there.
        """
        if state is None:
            state = self.init_state(idx.shape[0])
        x = self.inputs(idx[None])[0]  # (B, I)
        rnn = self.rnn
        if isinstance(rnn, GRU) and resolve_impl(rnn.impl, rnn.reset_after, x.device) == "fused":
            from . import fused

            new = []
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(rnn.all_weights):
                x = fused.gru_step(x, state[layer], w_ih, w_hh, b_ih, b_hh, rnn.reset_after)  # (B, H)
                new.append(x)
            state = torch.stack(new)  # (L, B, H)
            out = x
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
