"""Continue a prefix: greedy (the notes' ``predict``), temperature, top-k, top-p.

The prefix is read once, in one forward pass; after that each new token costs
one recurrent step with the state carried (the fused single-step path for a
GRU), never a re-run of the text so far.

    for piece in generate(model, vocab, "The Time ", 100, temperature=0.8):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from grulab.lm.data import Vocab, check_sampling, encode_prefix
from grulab.errors import GrulabError
from grulab.lm.model import LanguageModel

__all__ = ["check_sampling", "encode_prefix", "generate", "predict", "sample_next"]


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Pick the next token from logits (B, V) -> ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    # below the dtype's smallest normal number a temperature is as greedy as that number
    # (and would round to 0 in float32, making 0/0 of the top logit)
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V); max 0, so no overflow
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
        # keep the smallest set whose mass reaches top_p (the first token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # (B, V)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model: LanguageModel, vocab: Vocab, prefix: str, length: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None) -> Iterator[str]:
    """Yield ``length`` new tokens (as text) continuing ``prefix``.

    ``temperature=0`` is greedy decoding, the notes' ``predict``; otherwise it
    samples, optionally from the ``top_k`` most likely tokens or the smallest
    set whose probability reaches ``top_p``.
    """
    check_sampling(length, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    ids = torch.tensor([encode_prefix(vocab, prefix)])  # (1, P)
    logits, state = model(ids)  # read the prefix once: (1, P, V)
    logits = logits[:, -1]  # (1, V)
    sep = "" if vocab.level == "char" else " "
    try:
        for i in range(length):
            if not torch.isfinite(logits).all():
                raise GrulabError(f"the model's output is not finite (NaN or Inf) at token {i + 1}: its weights "
                                  "overflow on this input; use an earlier checkpoint or retrain with a lower --lr")
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
            yield sep + vocab.idx_to_token[int(nxt)]
            logits, state = model.step(nxt, state)  # (1, V)
    finally:
        model.train(was_training)


def predict(model: LanguageModel, vocab: Vocab, prefix: str, length: int) -> str:
    """The notes' ``predict``: the prefix followed by its greedy continuation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prefix + "".join(generate(model, vocab, prefix, length))
