"""See what the gates do: colour a text by a trained GRU's update and reset gates (a minGRU's z).

Three steps, each usable on its own::

    trace = trace_gates(model, ids)                 # r, z, ñ, h per layer, and next-token guesses
    write_gate_html(trace, tokens, "gates.html")    # one self-contained interactive page
    write_gate_png(trace, tokens, "gates.png")      # a static heatmap (grulab.views.plots.gate_heatmap)

and one call for the CLI (``grulab viz RUN --text ... --out gates.html``)::

    render(model, vocab, text, "gates.html")

The trace recomputes the model's GRU step by step with the notes' equations,
:func:`grulab.reference.trace`, so every number shown is one of the
equations' ``R_t``, ``Z_t``, ``H̃_t`` or ``H_t``. Reading the colours: the new
state is ``h' = z ⊙ h + (1 − z) ⊙ ñ``, so an update gate z ≈ 1 *keeps* a unit's
state and z ≈ 0 *rewrites* it with the candidate ñ; a reset gate r ≈ 0 makes
the candidate ignore the old state.

A minGRU (``--cell mingru`` or ``mingru-block``) has one gate, z, read from
:meth:`grulab.MinGRU.trace`, and the opposite convention: ``h' = (1 − z) ⊙ h + z ⊙ h̃``,
so its z ≈ 1 *writes* the candidate and z ≈ 0 keeps the state. The page and
the PNG say so, and colour by meaning (keep blue, write orange) for both cells.

The page also draws the gate-saturation plot of Karpathy, Johnson & Fei-Fei
(2015, "Visualizing and Understanding Recurrent Networks"): for each unit, the
fraction of time steps its gate is below 0.1 (left-saturated) against the
fraction above 0.9 (right-saturated). See :func:`gate_saturation`.

The page is three files of this package, ``gates.html`` (a :class:`string.Template`
with ``$title``, ``$css``, ``$js`` and ``$data``), ``gates.css`` and ``gates.js``.
"""
from __future__ import annotations

import html
import json
import warnings
from importlib import resources
from pathlib import Path
from string import Template
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from grulab import reference
from grulab.lm.data import encode_warning, tokenize
from grulab.errors import GrulabError
from grulab.gru import GRU
from grulab.mingru import MinGRU, MinGRUBlocks
from grulab.views.plots import gate_heatmap as write_gate_png

__all__ = [
    "SATURATION_LOW",
    "SATURATION_HIGH",
    "gate_saturation",
    "render",
    "trace_gates",
    "write_gate_html",
    "write_gate_png",
]

#: A gate below SATURATION_LOW is "left-saturated", above SATURATION_HIGH "right-saturated".
SATURATION_LOW = 0.1
SATURATION_HIGH = 0.9
#: Next-token guesses kept per position.
TOP_K = 5
#: The page's size budget. A page holds, per token, the token, its next-token guesses and gate
#: means (~250 bytes) and two gates' values for every unit of every layer (~4 bytes each).
PAGE_BYTES = 20_000_000
#: Tokens a page shows at most, however small the model (more is unreadable, and slow to trace).
PAGE_TOKENS = 10_000


def max_tokens(hidden: int, layers: int = 1) -> int:
    """The most tokens a page shows: under :data:`PAGE_BYTES` of page (5,900 for a 1×384 GRU) and
    at most :data:`PAGE_TOKENS`; tracing them takes well under 1 GB of memory."""
    return max(1, min(PAGE_TOKENS, PAGE_BYTES // (300 + 2 * 4 * hidden * layers)))

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------


def _check_gru(model) -> Union[GRU, MinGRU, MinGRUBlocks]:
    """The model's gated stack (a GRU or a minGRU), or a GrulabError (a ValueError) naming its cell."""
    if isinstance(model.rnn, (GRU, MinGRU, MinGRUBlocks)):
        return model.rnn
    raise GrulabError(
        f"gate visualisation needs a GRU or minGRU model, but this one's cell is {model.config.cell!r} "
        f"(it has no update gate); train one with --cell gru, mingru or mingru-block"
    )


def _layer_arrays(values: dict) -> dict:
    """Per gate, (T, 1, H) tensors -> (T, H) float32 numpy arrays."""
    return {name: t[:, 0].detach().cpu().float().numpy() for name, t in values.items()}


@torch.no_grad()
def trace_gates(model, ids: Sequence[int], top_k: int = TOP_K) -> dict:
    """Run a GRU or minGRU language model over ``ids`` one step at a time and record every gate.

    ``model`` is a :class:`grulab.lm.model.LanguageModel` with ``cell="gru"``: its
    ``inputs`` turn ids into vectors, ``rnn`` is a :class:`grulab.GRU`, ``head``
    maps the top layer's state to next-token logits. The sequence is run as a
    batch of one from a zero state, in eval mode (no dropout), each step of each
    layer through :func:`grulab.reference.gru_step` (:func:`grulab.reference.trace`)
    with the model's weights.

    Returns a dict of numpy arrays (T = len(ids), H = hidden units, L = layers)::

        {"ids": [int] * T,
         "layers": [{"r": (T, H), "z": (T, H), "n": (T, H), "h": (T, H)}] * L,
         "top_ids": (T, k) int64,     # the k likeliest next tokens after each position
         "top_probs": (T, k) float32, # their probabilities, descending
         "hidden": H, "num_layers": L, "reset_after": bool,
         "gates": ("z", "r"), "z_writes": False, "cell": "gru"}

    A minGRU model (``cell="mingru"`` or ``"mingru-block"``) is traced by its own
    :meth:`~grulab.MinGRU.trace` (the formula loop); its layers hold z, n and h only
    (``gates == ("z",)``, no reset gate), ``z_writes`` is True (z ≈ 1 writes the
    candidate), and the guesses come from the model's forward pass. For the block,
    a layer is a block and h is its minGRU's state.

    Raises GrulabError (a ValueError) if the model has no gates or ``ids`` is empty.
    """
    rnn = _check_gru(model)
    ids = [int(i) for i in ids]
    if not ids:
        raise GrulabError("nothing to trace: the token sequence is empty; give some text")
    if getattr(rnn, "bidirectional", False):
        raise GrulabError("gate tracing supports one-directional GRUs only")
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor(ids, dtype=torch.long, device=model.head.weight.device)[:, None]  # (T, 1)
        if isinstance(rnn, GRU):
            traced = reference.trace(rnn, model.inputs(idx))  # per layer: r, z, n, h, each (T, 1, H)
            layers = [_layer_arrays(step._asdict()) for step in traced]
            logits = model.head(traced[-1].h[:, 0])  # (T, V)
        else:
            z, n, h = rnn.trace(model.inputs(idx))  # each (L, T, 1, H)
            layers = [_layer_arrays(dict(z=z[k], n=n[k], h=h[k])) for k in range(z.shape[0])]
            logits = model(idx.t())[0][0]  # (T, V)
        probs = F.softmax(logits.float(), dim=-1)  # (T, V)
        top_probs, top_ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (T, k), descending
    finally:
        model.train(was_training)
    gru = isinstance(rnn, GRU)
    return {
        "ids": ids,
        "layers": layers,
        "top_ids": top_ids.cpu().numpy(),
        "top_probs": top_probs.cpu().numpy(),
        "hidden": int(layers[0]["z"].shape[1]),
        "num_layers": len(layers),
        "reset_after": rnn.reset_after if gru else None,
        "gates": ("z", "r") if gru else ("z",),
        "z_writes": not gru,
        "cell": model.config.cell,
    }


def gate_saturation(
    gate, low: float = SATURATION_LOW, high: float = SATURATION_HIGH
) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the fraction of time steps a gate is left- and right-saturated.

    ``gate`` (T, H) -> (left (H,), right (H,)): ``left[u]`` is the fraction of
    the T steps with ``gate[:, u] < low``, ``right[u]`` the fraction with
    ``gate[:, u] > high`` (Karpathy, Johnson & Fei-Fei 2015).

    For the update gate, a unit high on the right axis is an *integrator*
    (z ≈ 1 most of the time: it keeps its state across many steps); one far
    out on the left axis rewrites its state at almost every step, like a plain
    RNN unit. For the reset gate, left-saturation means the candidate often
    ignores the unit's previous state.
    """
    g = np.asarray(gate, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] == 0:
        raise ValueError(f"gate must be a (T, H) array with T >= 1, got shape {g.shape}")
    return (g < low).mean(axis=0), (g > high).mean(axis=0)


# ---------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------


def _permille(a: np.ndarray) -> list[int]:
    """Gate values in [0, 1] as integers 0..1000 (keeps the embedded JSON small)."""
    return np.rint(np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0) * 1000).astype(int).ravel().tolist()


def _page_data(
    trace: dict,
    tokens: Sequence[str],
    title: str,
    joiner: str,
    top_tokens: Optional[Sequence[Sequence[str]]],
    unknown: Optional[Sequence[bool]],
) -> dict:
    T = len(trace["ids"])
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} tokens for a trace of {T} steps; they must match")
    if top_tokens is None:
        top_tokens = trace.get("top_tokens")
    if top_tokens is None:
        top_tokens = [[f"#{i}" for i in row] for row in np.asarray(trace["top_ids"]).tolist()]
    layers = []
    gates = tuple(trace.get("gates", ("z", "r")))
    for record in trace["layers"]:
        layer = {"H": int(record["z"].shape[1])}
        for gate in gates:
            values = np.asarray(record[gate])  # (T, H)
            left, right = gate_saturation(values)
            layer[gate] = _permille(values)  # T*H, row-major: index t*H + u
            layer[gate + "_mean"] = np.round(values.mean(axis=1), 4).tolist()  # (T,)
            layer[gate + "_sat"] = {"left": np.round(left, 4).tolist(), "right": np.round(right, 4).tolist()}
        layers.append(layer)
    probs = np.asarray(trace["top_probs"], dtype=np.float64)
    return {
        "title": title,
        "tokens": list(tokens),
        "joiner": joiner,
        "unknown": [bool(u) for u in unknown] if unknown is not None else [False] * T,
        "top": [
            [[str(tok), round(float(p), 4)] for tok, p in zip(toks, ps)]
            for toks, ps in zip(top_tokens, probs)
        ],
        "layers": layers,
        "gates": list(gates),
        "z_writes": bool(trace.get("z_writes", False)),  # minGRU: z ≈ 1 writes the candidate
        "cell": trace.get("cell", "gru"),
        "reset_after": bool(trace.get("reset_after")),
        "sat_low": SATURATION_LOW,
        "sat_high": SATURATION_HIGH,
    }


def write_gate_html(
    trace: dict,
    tokens: Sequence[str],
    out_path: PathLike,
    title: Optional[str] = None,
    *,
    joiner: str = "",
    top_tokens: Optional[Sequence[Sequence[str]]] = None,
    unknown: Optional[Sequence[bool]] = None,
) -> Path:
    """Write one self-contained interactive HTML page for a trace.

    ``tokens`` are the T strings shown, one per traced step (characters, or
    words with ``joiner=" "``). The next-token guesses are shown as
    ``top_tokens`` (T lists of k strings), else ``trace["top_tokens"]``, else
    as raw ids. ``unknown`` (T booleans) marks tokens the model read as <unk>.

    The page needs nothing but a browser: CSS, script and data are inline and
    nothing is fetched from the network. ``title`` defaults to :func:`default_title`.
    """
    title = title or default_title(trace)
    data = _page_data(trace, tokens, title, joiner, top_tokens, unknown)
    # "<" escaped so that no "</script>" in a token can end the data block early.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    assets = resources.files(__package__)
    page = Template(assets.joinpath("gates.html").read_text(encoding="utf-8")).substitute(
        title=html.escape(title),
        css=assets.joinpath("gates.css").read_text(encoding="utf-8"),
        js=assets.joinpath("gates.js").read_text(encoding="utf-8"),
        data=payload,
        footer=_FOOTER[bool(data["z_writes"])],
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def default_title(trace: dict) -> str:
    """"What the GRU's gates do", or the minGRU's."""
    return "What the minGRU's update gate does" if trace.get("z_writes") else "What the GRU's gates do"


#: The page's footer: the update rule, and where the numbers come from (GRU, minGRU).
_FOOTER = {
    False: "h&prime; = z &odot; h + (1 &minus; z) &odot; h&#771; &middot; gates recomputed with the notes' "
           "equations (grulab.reference.gru_step)",
    True: "minGRU: h&prime; = (1 &minus; z) &odot; h + z &odot; h&#771;, z and h&#771; read only the input "
          "&middot; z &asymp; 1 writes, the opposite of the GRU's z &middot; values from grulab.MinGRU.trace",
}


# ---------------------------------------------------------------------------
# The entry point of ``grulab viz``
# ---------------------------------------------------------------------------

_HTML_SUFFIXES = (".html", ".htm")
_PNG_SUFFIXES = (".png",)


def render(model, vocab, text: str, out_path: PathLike, title: Optional[str] = None) -> Path:
    """Trace ``model`` over ``text`` and write ``out_path``: an .html page or a .png heatmap.

    ``vocab`` is a :class:`grulab.lm.data.Vocab` or anything with its ``level``
    ("char" or "word": how ``text`` is split), ``encode``, ``unk`` and
    ``idx_to_token``. Tokens the vocabulary does not know are read as <unk>
    (with a warning) and still shown as written.

    A text longer than :func:`max_tokens` is cut to its start, with a warning.
    Raises GrulabError (one line) for an unsupported suffix, an empty text or
    a model that is neither a GRU nor a minGRU.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in _HTML_SUFFIXES + _PNG_SUFFIXES:
        raise GrulabError(
            f"cannot write {out_path.name!r}: the output must end in .html (interactive page) "
            f"or .png (heatmap), not {suffix or 'nothing'!r}"
        )
    rnn = _check_gru(model)
    tokens = tokenize(text or "", vocab.level)
    if not tokens:
        raise GrulabError("the text to visualise is empty; give some text with --text or --file")
    limit = max_tokens(rnn.hidden_size, rnn.num_layers)
    if len(tokens) > limit:  # cut before tracing: the trace of a long text alone would take gigabytes
        warnings.warn(f"the text has {len(tokens):,} tokens; the page shows the first {limit:,} (at most "
                      f"{PAGE_TOKENS:,}, and under {PAGE_BYTES // 1_000_000} MB of page for this "
                      f"{rnn.num_layers}×{rnn.hidden_size} {'GRU' if isinstance(rnn, GRU) else 'minGRU'}); give a shorter passage to see another part", stacklevel=2)
        tokens = tokens[:limit]
    ids = encode_warning(vocab, tokens, "the text")
    unknown = [i == vocab.unk and tok != "<unk>" for tok, i in zip(tokens, ids)]

    trace = trace_gates(model, ids)
    trace["top_tokens"] = [[str(vocab.idx_to_token[i]) for i in row] for row in trace["top_ids"].tolist()]
    if title is None:
        title = default_title(trace)
    if suffix in _PNG_SUFFIXES:
        return write_gate_png(trace, tokens, out_path, title=title)
    return write_gate_html(
        trace, tokens, out_path, title, joiner="" if vocab.level == "char" else " ", unknown=unknown
    )
