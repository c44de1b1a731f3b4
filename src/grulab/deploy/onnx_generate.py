"""Generation through onnxruntime, without torch: numpy, onnxruntime and the run's vocab.json.

    lm = OnnxLanguageModel("model.onnx")               # written by grulab.export_onnx
    vocab = lm.vocab                                   # stored in the file, or Vocab.load(".../vocab.json")
    for piece in generate(lm, vocab, "The Time ", 100, temperature=0.8):
        print(piece, end="", flush=True)

The same decoding as :mod:`grulab.lm.generate`: the prefix is read in one run of
the graph, then each new token is one run of one step with the state carried;
``temperature=0`` is greedy, otherwise :func:`sample_next` samples, optionally
from the top k tokens or the smallest set whose probability reaches top p.
Random draws come from a numpy Generator, so a seed gives another (equally
distributed) text than the same seed under torch; greedy text is the same.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Union

import numpy as np

from grulab.lm.data import Vocab, check_sampling, encode_prefix
from grulab.errors import GrulabError


def sample_next(logits: np.ndarray, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Pick the next token from logits (B, V) -> ids (B,). temperature 0 is greedy.

    numpy's form of :func:`grulab.lm.generate.sample_next`, rule for rule.
    """
    if temperature == 0:
        return logits.argmax(axis=-1)  # (B,)
    rng = rng if rng is not None else np.random.default_rng()
    # below the input dtype's smallest normal number a temperature is as greedy as that number
    # (as generate's floor: the logits arrive as float32, where a smaller one rounds to 0)
    temperature = max(temperature, float(np.finfo(logits.dtype).tiny))
    logits = (logits - logits.max(axis=-1, keepdims=True)).astype(np.float64) / temperature  # (B, V); max 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k]  # (B, 1): the k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, V)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V), most likely first
        sorted_p = np.take_along_axis(probs, order, -1)
        # keep the smallest set whose mass reaches top_p (the first token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # (B, V)
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_p), -1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)  # (B,)


class OnnxLanguageModel:
    """A language model written by :func:`grulab.export_onnx`, run by onnxruntime.

    ``lm(tokens, state)``: tokens (B, T) int64, state None (zeros) or the dict
    a previous call returned -> logits (B, T, V) float32 and the new state, a
    dict of the graph's state inputs (``state``, and ``cell`` for an LSTM).
    """

    def __init__(self, path: Union[str, os.PathLike], threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise GrulabError("onnxruntime is not installed: pip install 'grulab[export]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the state inputs are overridable initializers by design: no warning
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GrulabError(f"cannot load {path} with onnxruntime ({first}); "
                              f"give a file written by `grulab export RUN --onnx FILE`") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if not inputs or inputs[0] != "tokens" or not outputs or outputs[0] != "logits":
            raise GrulabError(f"{path} is not a grulab language model (inputs {inputs}, outputs {outputs}); "
                              f"export one with `grulab export RUN --onnx FILE`")
        # the state inputs have zeros as defaults, so onnxruntime lists them as overridable initializers
        self.state_names = inputs[1:] + [i.name for i in self.session.get_overridable_initializers()]
        missing = [s for s in self.state_names if "new_" + s not in outputs]
        if missing:
            raise GrulabError(f"{path} is not a grulab language model (state inputs {missing} have no new_ "
                              f"outputs); export one with `grulab export RUN --onnx FILE`")
        self._outputs = ["logits"] + ["new_" + s for s in self.state_names]
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        meta = self.session.get_modelmeta().custom_metadata_map
        # the vocabulary stored by export_onnx(..., vocab=...), or None
        self.vocab = Vocab.from_dict(json.loads(meta["grulab_vocab"]), source=f"{path} metadata") \
            if "grulab_vocab" in meta else None

    def __call__(self, tokens: np.ndarray, state: Optional[dict] = None) -> tuple[np.ndarray, dict]:
        feed = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64), **(state or {})}
        logits, *new = self.session.run(self._outputs, feed)
        return logits, dict(zip(self.state_names, new))


def generate(lm: OnnxLanguageModel, vocab: Vocab, prefix: str, length: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             rng: Optional[np.random.Generator] = None) -> Iterator[str]:
    """Yield ``length`` new tokens (as text) continuing ``prefix``, as :func:`grulab.lm.generate.generate`."""
    check_sampling(length, temperature, top_k, top_p)
    if lm.vocab_size != len(vocab):
        raise GrulabError(f"the ONNX model has {lm.vocab_size} output tokens, the vocabulary {len(vocab)}: "
                          f"use the vocab.json of the run the model was exported from")
    ids = np.array([encode_prefix(vocab, prefix)], dtype=np.int64)  # (1, P)
    logits, state = lm(ids)  # read the prefix once: (1, P, V)
    logits = logits[:, -1]  # (1, V)
    sep = "" if vocab.level == "char" else " "
    for i in range(length):
        if not np.isfinite(logits).all():  # generate's check, word for word
            raise GrulabError(f"the model's output is not finite (NaN or Inf) at token {i + 1}: its weights "
                              "overflow on this input; use an earlier checkpoint or retrain with a lower --lr")
        nxt = sample_next(logits, temperature, top_k, top_p, rng)  # (1,)
        yield sep + vocab.idx_to_token[int(nxt[0])]
        logits, state = lm(nxt[:, None], state)  # (1, 1, V)
        logits = logits[:, -1]  # (1, V)
