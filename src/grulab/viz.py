"""See what the gates do: colour a text by a trained GRU's update and reset gates.

Three steps, each usable on its own::

    trace = trace_gates(model, ids)                 # r, z, ñ, h per layer, and next-token guesses
    write_gate_html(trace, tokens, "gates.html")    # one self-contained interactive page
    write_gate_png(trace, tokens, "gates.png")      # a static heatmap

and one call for the CLI (``grulab viz RUN --text ... --out gates.html``)::

    render(model, vocab, text, "gates.html")

The trace recomputes the model's GRU step by step with the notes' equations,
:func:`grulab.reference.gru_step`, so every number shown is one of the
equations' ``R_t``, ``Z_t``, ``H̃_t`` or ``H_t``. Reading the colours: the new
state is ``h' = z ⊙ h + (1 − z) ⊙ ñ``, so an update gate z ≈ 1 *keeps* a unit's
state and z ≈ 0 *rewrites* it with the candidate ñ; a reset gate r ≈ 0 makes
the candidate ignore the old state.

The page also draws the gate-saturation plot of Karpathy, Johnson & Fei-Fei
(2015, "Visualizing and Understanding Recurrent Networks"): for each unit, the
fraction of time steps its gate is below 0.1 (left-saturated) against the
fraction above 0.9 (right-saturated). See :func:`gate_saturation`.
"""
from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import GrulabError
from .gru import GRU
from .reference import gru_step

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
#: The PNG heatmap shows at most this many tokens.
PNG_MAX_TOKENS = 200

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------


def _check_gru(model) -> GRU:
    """The model's GRU, or a GrulabError (a ValueError) naming the cell it has instead."""
    rnn = getattr(model, "rnn", None)
    cell = getattr(getattr(model, "config", None), "cell", None)
    if isinstance(rnn, GRU) and cell in (None, "gru"):
        return rnn
    name = cell or type(rnn).__name__
    raise GrulabError(
        f"gate visualisation needs a GRU model, but this one's cell is {name!r} "
        f"(an LSTM or plain RNN has no update and reset gates); train one with --cell gru"
    )


@torch.no_grad()
def trace_gates(model, ids: Sequence[int], top_k: int = TOP_K) -> dict:
    """Run a GRU language model over ``ids`` one step at a time and record every gate.

    ``model`` is a :class:`grulab.model.LanguageModel` with ``cell="gru"``: its
    ``inputs`` turn ids into vectors, ``rnn`` is a :class:`grulab.GRU`, ``head``
    maps the top layer's state to next-token logits. The sequence is run as a
    batch of one from a zero state, in eval mode (no dropout), each step of each
    layer through :func:`grulab.reference.gru_step` with the model's weights.

    Returns a dict of numpy arrays (T = len(ids), H = hidden units, L = layers)::

        {"ids": [int] * T,
         "layers": [{"r": (T, H), "z": (T, H), "n": (T, H), "h": (T, H)}] * L,
         "top_ids": (T, k) int64,     # the k likeliest next tokens after each position
         "top_probs": (T, k) float32, # their probabilities, descending
         "hidden": H, "num_layers": L, "reset_after": bool}

    Raises GrulabError (a ValueError) if the model is not a GRU or ``ids`` is empty.
    """
    rnn = _check_gru(model)
    ids = [int(i) for i in ids]
    if not ids:
        raise GrulabError("nothing to trace: the token sequence is empty; give some text")
    if rnn.bidirectional:
        raise GrulabError("gate tracing supports one-directional GRUs only")
    was_training = model.training
    model.eval()
    try:
        device = model.head.weight.device
        idx = torch.tensor(ids, dtype=torch.long, device=device)[:, None]  # (T, 1)
        x = model.inputs(idx)  # (T, 1, I)
        layers = []
        for weights in rnn.all_weights:
            w_ih, w_hh = weights[0], weights[1]
            b_ih, b_hh = (weights[2], weights[3]) if rnn.bias else (None, None)
            h = x.new_zeros(1, rnn.hidden_size)  # (1, H)
            steps = []
            for x_t in x:  # x_t (1, I)
                step = gru_step(x_t, h, w_ih, w_hh, b_ih, b_hh, rnn.reset_after)
                h = step.h  # (1, H)
                steps.append(step)
            record = {
                name: torch.cat([getattr(s, name) for s in steps])  # (T, H)
                for name in ("r", "z", "n", "h")
            }
            layers.append(record)
            x = record["h"][:, None, :]  # (T, 1, H): the next layer's input
        logits = model.head(layers[-1]["h"])  # (T, V)
        probs = F.softmax(logits.float(), dim=-1)  # (T, V)
        k = min(top_k, probs.shape[-1])
        top_probs, top_ids = probs.topk(k, dim=-1)  # (T, k), descending
    finally:
        model.train(was_training)
    return {
        "ids": ids,
        "layers": [
            {name: t.detach().cpu().float().numpy() for name, t in record.items()} for record in layers
        ],
        "top_ids": top_ids.cpu().numpy(),
        "top_probs": top_probs.cpu().numpy(),
        "hidden": rnn.hidden_size,
        "num_layers": rnn.num_layers,
        "reset_after": rnn.reset_after,
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


def _visible(token: str) -> str:
    """A token as it should appear in a tooltip: whitespace made visible."""
    return {"\n": "⏎", " ": "␣", "\t": "⇥", "\r": "␍", "": "∅"}.get(token, token)


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
    for record in trace["layers"]:
        layer = {"H": int(record["z"].shape[1])}
        for gate in ("z", "r"):
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
        "reset_after": bool(trace.get("reset_after", True)),
        "sat_low": SATURATION_LOW,
        "sat_high": SATURATION_HIGH,
    }


def write_gate_html(
    trace: dict,
    tokens: Sequence[str],
    out_path: PathLike,
    title: str = "What the GRU's gates do",
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
    nothing is fetched from the network.
    """
    data = _page_data(trace, tokens, title, joiner, top_tokens, unknown)
    # "<" escaped so that no "</script>" in a token can end the data block early.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = (
        _HTML_TEMPLATE.replace("__TITLE__", html.escape(title))
        .replace("__CSS__", _CSS)
        .replace("__JS__", _JS)
        .replace("__DATA__", payload)
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<main>
<header>
  <h1>__TITLE__</h1>
  <p class="sub" id="summary"></p>
</header>

<section class="card controls" aria-label="controls">
  <fieldset class="ctl">
    <legend>gate</legend>
    <label><input type="radio" name="gate" id="gate-z" value="z" checked> update <b>z</b></label>
    <label><input type="radio" name="gate" id="gate-r" value="r"> reset <b>r</b></label>
  </fieldset>
  <fieldset class="ctl unitctl">
    <legend>hidden unit</legend>
    <label><input type="checkbox" id="mean" checked> mean of all units</label>
    <input type="range" id="unit" min="0" max="0" value="0" aria-label="unit">
    <input type="number" id="unitnum" min="0" max="0" value="0" aria-label="unit number">
  </fieldset>
  <fieldset class="ctl" id="layerctl">
    <legend>layer</legend>
    <select id="layer" aria-label="layer"></select>
  </fieldset>
  <fieldset class="ctl">
    <legend>colours</legend>
    <label title="spread the colour scale over the smallest to largest value shown"><input type="checkbox" id="stretch" checked> stretch to range</label>
  </fieldset>
</section>

<section class="card legend" aria-label="legend">
  <div class="bar-wrap">
    <div class="bar" id="bar"></div>
    <div class="bar-labels"><span id="bar-lo"></span><span id="bar-mid"></span><span id="bar-hi"></span></div>
  </div>
  <p id="legend-text"></p>
</section>

<section class="card textcard" aria-label="text">
  <div id="text" class="text"></div>
  <p class="hint">Hover over a character to see its gates and the model's five best guesses for what comes next.</p>
</section>

<section class="card" aria-label="gate saturation">
  <h2>Which units integrate, which reset?</h2>
  <div class="plots">
    <figure><div id="sat-z"></div><figcaption>update gate <b>z</b></figcaption></figure>
    <figure><div id="sat-r"></div><figcaption>reset gate <b>r</b></figcaption></figure>
    <div id="unitinfo" class="unitinfo"></div>
  </div>
  <p class="note">Each dot is one hidden unit of the selected layer, measured over this text.
  <b>x</b>: the fraction of steps its gate is below 0.1 (left-saturated);
  <b>y</b>: the fraction above 0.9 (right-saturated). An update-gate unit near the
  top left is an <i>integrator</i>: z&nbsp;&asymp;&nbsp;1 nearly always, so it carries its state
  across long stretches of text. One near the bottom right rewrites its state at almost
  every step, like a plain RNN unit. A reset-gate unit far to the right often makes the
  candidate ignore its old state. Dots near the corner (0,&nbsp;0) work in the gate's
  middle range. Click a dot to colour the text by that unit.
  After Karpathy, Johnson &amp; Fei-Fei (2015), <i>Visualizing and Understanding Recurrent Networks</i>.</p>
</section>
<footer>grulab &middot; h&prime; = z &odot; h + (1 &minus; z) &odot; h&#771; &middot; gates recomputed with the notes' equations (grulab.reference.gru_step)</footer>
</main>
<div id="tooltip" role="tooltip" hidden></div>
<script type="application/json" id="gate-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = r"""
:root {
  --bg: #f6f5f1; --card: #ffffff; --ink: #1d2330; --muted: #667085; --line: #e4e2dc;
  --accent: #2166ac;
  --sans: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 15px/1.5 var(--sans); }
main { max-width: 1080px; margin: 0 auto; padding: 28px 20px 40px; }
header h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; font-weight: 650; }
.sub { margin: 0 0 16px; color: var(--muted); }
h2 { font-size: 17px; margin: 0 0 10px; font-weight: 600; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
        padding: 14px 18px; margin: 0 0 14px; box-shadow: 0 1px 2px rgba(16,24,40,.04); }
.controls { display: flex; flex-wrap: wrap; gap: 10px 26px; align-items: flex-end; }
fieldset.ctl { border: 0; margin: 0; padding: 0; display: flex; gap: 12px; align-items: center; }
fieldset.ctl legend { font-size: 11px; text-transform: uppercase; letter-spacing: .08em;
                      color: var(--muted); padding: 0; margin-bottom: 4px; }
fieldset.ctl label { cursor: pointer; white-space: nowrap; }
input[type=range] { width: 180px; accent-color: var(--accent); }
input[type=number] { width: 64px; font: 14px var(--mono); padding: 2px 4px;
                     border: 1px solid var(--line); border-radius: 6px; }
select { font: inherit; padding: 2px 6px; border-radius: 6px; border: 1px solid var(--line); }
.unitctl.mean input[type=range], .unitctl.mean input[type=number] { opacity: .45; }
.legend { display: flex; gap: 22px; align-items: center; flex-wrap: wrap; }
.bar-wrap { width: 300px; flex: none; }
.bar { height: 14px; border-radius: 7px; border: 1px solid var(--line); }
.bar-labels { display: flex; justify-content: space-between; font: 12px var(--mono); color: var(--muted); margin-top: 3px; }
#legend-text { margin: 0; flex: 1; min-width: 260px; color: #394150; }
.text { font: 16px/1.9 var(--mono); white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 3px; padding: 1px 0; cursor: default; transition: background-color .12s; }
.tok:hover { outline: 2px solid var(--ink); outline-offset: 0; }
.tok.nl::before { content: "\23CE"; opacity: .35; font-size: 12px; }
.tok.unk { text-decoration: underline dotted #b42318; }
.hint { color: var(--muted); font-size: 13px; margin: 8px 0 0; }
.plots { display: flex; gap: 24px; flex-wrap: wrap; }
figure { margin: 0; }
figcaption { text-align: center; color: var(--muted); font-size: 13px; }
.note { color: #394150; font-size: 13.5px; max-width: 860px; }
.unitinfo { flex: 1; min-width: 220px; font-size: 13.5px; color: #394150; padding-top: 22px; }
.unitinfo h3 { font-size: 14px; margin: 0 0 6px; }
.unitinfo .num { font-family: var(--mono); }
svg .dot { cursor: pointer; }
svg .dot:hover { stroke: var(--ink); stroke-width: 2; }
svg .sel { stroke: #111; stroke-width: 2.5; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 18px; }
#tooltip { position: fixed; z-index: 10; pointer-events: none; min-width: 210px; max-width: 300px;
  background: #111827; color: #f9fafb; border-radius: 10px; padding: 10px 12px;
  font: 13px/1.45 var(--sans); box-shadow: 0 8px 24px rgba(0,0,0,.25); }
#tooltip .ch { font: 600 20px var(--mono); background: #374151; border-radius: 6px; padding: 0 7px; margin-right: 6px; }
#tooltip .pos { color: #9ca3af; }
#tooltip table { border-collapse: collapse; width: 100%; margin-top: 6px; }
#tooltip td { padding: 1px 4px 1px 0; vertical-align: middle; }
#tooltip td.k { font-family: var(--mono); white-space: pre; }
#tooltip td.p { text-align: right; font-family: var(--mono); color: #d1d5db; width: 48px; }
#tooltip .pb { height: 7px; border-radius: 4px; background: #60a5fa; }
#tooltip tr.hit td.k { color: #86efac; font-weight: 700; }
#tooltip .gv { font-family: var(--mono); }
#tooltip .lbl { color: #9ca3af; font-size: 11px; text-transform: uppercase; letter-spacing: .06em; margin-top: 6px; }
#tooltip .warn { color: #fca5a5; font-size: 12px; }
"""

_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("gate-data").textContent);
  const T = D.tokens.length;
  // Colour scales: [value, [r, g, b]] stops; z: orange (rewrite) - white - blue (keep),
  // r: magenta (reset) - white - green (use the old state).
  const SCALES = {
    z: [[0, [202, 75, 18]], [0.25, [244, 165, 110]], [0.5, [247, 246, 242]], [0.75, [122, 176, 218]], [1, [29, 88, 160]]],
    r: [[0, [142, 30, 110]], [0.25, [215, 140, 195]], [0.5, [246, 246, 242]], [0.75, [150, 200, 120]], [1, [45, 110, 40]]]
  };
  const NAMES = { z: "update gate z", r: "reset gate r" };
  const LEGEND = {
    z: "<b>Update gate z.</b> h&prime; = z&odot;h + (1&minus;z)&odot;h&#771;. " +
       "<b style='color:rgb(29,88,160)'>z &asymp; 1: keeps</b> the old state (nothing new to write down); " +
       "<b style='color:rgb(202,75,18)'>z &asymp; 0: rewrites</b> it with the candidate h&#771; (something worth remembering).",
    r: "<b>Reset gate r.</b> The candidate h&#771; = tanh(x W + r&odot;(h W) + b). " +
       "<b style='color:rgb(45,110,40)'>r &asymp; 1: uses</b> the old state to form the candidate; " +
       "<b style='color:rgb(142,30,110)'>r &asymp; 0: resets</b>, the candidate ignores the past (a fresh start)."
  };
  const S = { gate: "z", unit: -1, layer: D.layers.length - 1, stretch: true };

  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const visible = (s) => ({ "\n": "\u23CE", " ": "\u2423", "\t": "\u21E5", "\r": "\u240D", "": "\u2205" }[s] ?? s);

  function colour(gate, v) {
    const st = SCALES[gate];
    v = Math.min(1, Math.max(0, v));
    for (let i = 1; i < st.length; i++) {
      if (v <= st[i][0]) {
        const [a, ca] = st[i - 1], [b, cb] = st[i];
        const f = (v - a) / (b - a || 1);
        return ca.map((c, j) => Math.round(c + f * (cb[j] - c)));
      }
    }
    return st[st.length - 1][1];
  }
  const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

  function value(layer, gate, t, unit) {
    const L = D.layers[layer];
    return unit < 0 ? L[gate + "_mean"][t] : L[gate][t * L.H + unit] / 1000;
  }

  // --- build the text -------------------------------------------------------
  const text = $("text");
  const frag = document.createDocumentFragment();
  const spans = [];
  D.tokens.forEach((tok, t) => {
    if (t > 0 && D.joiner) frag.appendChild(document.createTextNode(D.joiner));
    const s = document.createElement("span");
    s.className = "tok" + (tok === "\n" ? " nl" : "") + (D.unknown[t] ? " unk" : "");
    s.textContent = tok;
    s.dataset.t = t;
    spans.push(s);
    frag.appendChild(s);
  });
  text.appendChild(frag);

  // --- controls -------------------------------------------------------------
  const H = () => D.layers[S.layer].H;
  const layerSel = $("layer");
  D.layers.forEach((L, i) => {
    const o = document.createElement("option");
    o.value = i; o.textContent = `layer ${i + 1} of ${D.layers.length}` + (i === D.layers.length - 1 ? " (top)" : "");
    layerSel.appendChild(o);
  });
  layerSel.value = S.layer;
  if (D.layers.length < 2) $("layerctl").style.display = "none";

  function syncUnitInputs() {
    const max = H() - 1;
    for (const el of [$("unit"), $("unitnum")]) { el.max = max; }
    if (S.unit > max) S.unit = max;
    const u = Math.max(0, S.unit);
    $("unit").value = u; $("unitnum").value = u;
    $("mean").checked = S.unit < 0;
    document.querySelector(".unitctl").classList.toggle("mean", S.unit < 0);
  }

  document.querySelectorAll("input[name=gate]").forEach((el) =>
    el.addEventListener("change", () => { S.gate = el.value; update(); }));
  $("mean").addEventListener("change", (e) => { S.unit = e.target.checked ? -1 : +$("unit").value; update(); });
  $("unit").addEventListener("input", (e) => { S.unit = +e.target.value; update(); });
  $("unitnum").addEventListener("input", (e) => {
    const u = parseInt(e.target.value, 10);
    if (!isNaN(u) && u >= 0 && u < H()) { S.unit = u; update(); }
  });
  layerSel.addEventListener("change", () => { S.layer = +layerSel.value; update(); });
  $("stretch").addEventListener("change", (e) => { S.stretch = e.target.checked; update(); });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      const d = e.key === "ArrowRight" ? 1 : -1;
      S.unit = S.unit < 0 ? (d > 0 ? 0 : H() - 1) : (S.unit + d + H()) % H();
      update();
    } else if (e.key === "m") { S.unit = -1; update(); }
    else if (e.key === "z" || e.key === "r") { S.gate = e.key; $("gate-" + e.key).checked = true; update(); }
  });

  // --- saturation scatter plots (inline SVG) --------------------------------
  function scatter(gate) {
    const sat = D.layers[S.layer][gate + "_sat"];
    const W = 300, P = 40, TOP = 24, inner = W - P - 12;
    const X = (v) => P + v * inner, Y = (v) => TOP + (1 - v) * inner;
    const HT = TOP + inner + P;
    let s = `<svg width="${W}" height="${HT}" viewBox="0 0 ${W} ${HT}" role="img" aria-label="saturation of the ${NAMES[gate]}">`;
    s += `<rect x="${X(0)}" y="${Y(1)}" width="${inner}" height="${inner}" fill="#fbfaf7" stroke="#d0cec7"/>`;
    for (const g of [0.25, 0.5, 0.75]) {
      s += `<line x1="${X(g)}" y1="${Y(0)}" x2="${X(g)}" y2="${Y(1)}" stroke="#eeece6"/>`;
      s += `<line x1="${X(0)}" y1="${Y(g)}" x2="${X(1)}" y2="${Y(g)}" stroke="#eeece6"/>`;
    }
    s += `<line x1="${X(0)}" y1="${Y(1)}" x2="${X(1)}" y2="${Y(0)}" stroke="#c9c6bd" stroke-dasharray="4 4"/>`;
    for (const g of [0, 0.5, 1]) {
      s += `<text x="${X(g)}" y="${Y(0) + 16}" font-size="11" text-anchor="middle" fill="#667085">${g}</text>`;
      s += `<text x="${X(0) - 6}" y="${Y(g) + 4}" font-size="11" text-anchor="end" fill="#667085">${g}</text>`;
    }
    s += `<text x="${X(0.5)}" y="${HT - 4}" font-size="12" text-anchor="middle" fill="#394150">fraction &lt; 0.1 (left-saturated)</text>`;
    s += `<text transform="translate(11 ${Y(0.5)}) rotate(-90)" font-size="12" text-anchor="middle" fill="#394150">fraction &gt; 0.9 (right-saturated)</text>`;
    const hi = gate === "z" ? "\u2196 integrators: keep" : "\u2196 use the past";
    const lo = gate === "z" ? "rewrite every step \u2198" : "reset often \u2198";
    s += `<text x="${X(0)}" y="${Y(1) - 8}" font-size="11" fill="#98a2b3">${hi}</text>`;
    s += `<text x="${X(1)}" y="${Y(1) - 8}" font-size="11" text-anchor="end" fill="#98a2b3">${lo}</text>`;
    const fill = rgb(colour(gate, 0.92)), fillLo = rgb(colour(gate, 0.08));
    let sel = "";
    sat.left.forEach((l, u) => {
      const r = sat.right[u];
      const c = r >= l ? fill : fillLo;
      const dot = `<circle class="dot${u === S.unit ? " sel" : ""}" data-unit="${u}" cx="${X(l).toFixed(1)}" cy="${Y(r).toFixed(1)}" r="${u === S.unit ? 6 : 4}" fill="${c}" fill-opacity=".8" stroke="#fff" stroke-width=".8"><title>unit ${u}: ${(100 * l).toFixed(0)}% of steps < 0.1, ${(100 * r).toFixed(0)}% > 0.9</title></circle>`;
      if (u === S.unit) sel = dot; else s += dot;
    });
    return s + sel + "</svg>";
  }
  for (const g of ["z", "r"]) {
    $("sat-" + g).addEventListener("click", (e) => {
      const u = e.target.closest && e.target.closest(".dot");
      if (u) { S.unit = +u.dataset.unit; update(); }
    });
  }

  // --- repaint ---------------------------------------------------------------
  function update() {
    syncUnitInputs();
    const vals = new Array(T);
    let lo = Infinity, hi = -Infinity;
    for (let t = 0; t < T; t++) {
      const v = value(S.layer, S.gate, t, S.unit);
      vals[t] = v; if (v < lo) lo = v; if (v > hi) hi = v;
    }
    const stretch = S.stretch && hi - lo > 1e-6;
    const a = stretch ? lo : 0, b = stretch ? hi : 1;
    for (let t = 0; t < T; t++) {
      const f = (vals[t] - a) / (b - a);
      const c = colour(S.gate, f);
      spans[t].style.backgroundColor = rgb(c);
      spans[t].style.color = Math.abs(f - 0.5) > 0.36 ? "#fff" : "";
    }
    const stops = SCALES[S.gate].map(([v, c]) => `${rgb(c)} ${100 * v}%`).join(", ");
    $("bar").style.background = `linear-gradient(90deg, ${stops})`;
    $("bar-lo").textContent = a.toFixed(2);
    $("bar-mid").textContent = NAMES[S.gate] + (S.unit < 0 ? " (mean)" : ` (unit ${S.unit})`);
    $("bar-hi").textContent = b.toFixed(2);
    $("legend-text").innerHTML = LEGEND[S.gate];
    $("sat-z").innerHTML = scatter("z");
    $("sat-r").innerHTML = scatter("r");
    $("unitinfo").innerHTML = unitInfo();
  }

  function unitInfo() {
    const L = D.layers[S.layer];
    if (S.unit < 0) {
      const integ = L.z_sat.right.filter((v) => v > 0.5).length;
      const rew = L.z_sat.left.filter((v) => v > 0.5).length;
      return `<h3>all ${L.H} units</h3><p>` +
        `<span class="num">${integ}</span> unit${integ === 1 ? "" : "s"} keep their state (z&nbsp;&gt;&nbsp;0.9) on more than half the steps; ` +
        `<span class="num">${rew}</span> rewrite it (z&nbsp;&lt;&nbsp;0.1) on more than half.</p>` +
        `<p>Click a dot, drag the unit slider or press &larr; &rarr; to follow one unit through the text.</p>`;
    }
    const u = S.unit, pct = (v) => `<span class="num">${(100 * v).toFixed(0)}%</span>`;
    let zs = 0, rs = 0;
    for (let t = 0; t < T; t++) { zs += L.z[t * L.H + u]; rs += L.r[t * L.H + u]; }
    const kind = L.z_sat.right[u] > 0.5 ? "an integrator: it mostly keeps its state"
      : L.z_sat.left[u] > 0.5 ? "a fast unit: it mostly rewrites its state"
      : "a mixed unit: it keeps at some characters and rewrites at others";
    return `<h3>unit ${u}</h3><p>This unit is ${kind}.</p>` +
      `<p>update gate z: mean <span class="num">${(zs / T / 1000).toFixed(2)}</span>, ` +
      `below 0.1 at ${pct(L.z_sat.left[u])} and above 0.9 at ${pct(L.z_sat.right[u])} of the steps.<br>` +
      `reset gate r: mean <span class="num">${(rs / T / 1000).toFixed(2)}</span>, ` +
      `below 0.1 at ${pct(L.r_sat.left[u])}, above 0.9 at ${pct(L.r_sat.right[u])}.</p>`;
  }

  // --- tooltip ---------------------------------------------------------------
  const tip = $("tooltip");
  function fmt(v) { return v.toFixed(3); }
  function tipHTML(t) {
    const tok = D.tokens[t];
    const L = S.layer;
    const who = S.unit < 0 ? `mean of ${H()} units` : `unit ${S.unit}`;
    const z = value(L, "z", t, S.unit), r = value(L, "r", t, S.unit);
    const verdict = z > 0.5 ? "keeps" : "rewrites";
    let h = `<div><span class="ch">${esc(visible(tok))}</span><span class="pos">position ${t + 1} of ${T}</span></div>`;
    if (D.unknown[t]) h += `<div class="warn">not in the vocabulary: read as &lt;unk&gt;</div>`;
    h += `<div class="lbl">gates, ${esc(who)}${D.layers.length > 1 ? ", layer " + (L + 1) : ""}</div>`;
    h += `<div class="gv">z = ${fmt(z)} <span class="pos">(${verdict})</span><br>r = ${fmt(r)}</div>`;
    if (S.unit >= 0) h += `<div class="gv pos">mean z = ${fmt(value(L, "z", t, -1))}, mean r = ${fmt(value(L, "r", t, -1))}</div>`;
    h += `<div class="lbl">next, the model guesses</div><table>`;
    const next = t + 1 < T ? D.tokens[t + 1] : null;
    for (const [k, p] of D.top[t]) {
      h += `<tr class="${k === next ? "hit" : ""}"><td class="k">${esc(visible(k))}</td>` +
           `<td style="width:100%"><div class="pb" style="width:${Math.max(2, 100 * p).toFixed(1)}%"></div></td>` +
           `<td class="p">${(100 * p).toFixed(1)}%</td></tr>`;
    }
    h += `</table>`;
    if (next !== null) h += `<div class="pos">actually next: <span class="gv">${esc(visible(next))}</span></div>`;
    return h;
  }
  function place(e) {
    const pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    let x = e.clientX + pad, y = e.clientY + pad;
    if (x + w > window.innerWidth - 4) x = e.clientX - w - pad;
    if (y + h > window.innerHeight - 4) y = e.clientY - h - pad;
    tip.style.left = Math.max(4, x) + "px"; tip.style.top = Math.max(4, y) + "px";
  }
  text.addEventListener("mouseover", (e) => {
    const s = e.target.closest(".tok");
    if (!s) return;
    tip.innerHTML = tipHTML(+s.dataset.t);
    tip.hidden = false;
    place(e);
  });
  text.addEventListener("mousemove", (e) => { if (!tip.hidden) place(e); });
  text.addEventListener("mouseout", (e) => {
    if (!e.relatedTarget || !e.relatedTarget.closest || !e.relatedTarget.closest(".tok")) tip.hidden = true;
  });

  const Ls = D.layers.length;
  $("summary").textContent = `${T} tokens \u00b7 ${Ls} GRU layer${Ls > 1 ? "s" : ""} \u00b7 ${D.layers[Ls - 1].H} hidden units` +
    `${Ls > 1 ? " per layer" : ""} \u00b7 reset gate ${D.reset_after ? "after" : "before"} the matrix product` +
    ` \u00b7 keys: \u2190 \u2192 unit, m mean, z / r gate`;
  update();
})();
"""


# ---------------------------------------------------------------------------
# The PNG heatmap
# ---------------------------------------------------------------------------


def write_gate_png(
    trace: dict,
    tokens: Sequence[str],
    out_path: PathLike,
    *,
    layer: int = -1,
    max_tokens: int = PNG_MAX_TOKENS,
    title: Optional[str] = None,
) -> Path:
    """A static heatmap of one layer's gates: z and r (units × time) and their means.

    Shows the first ``max_tokens`` tokens (noted in the title when the text is
    longer); the tokens label the time axis when there are at most 100.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = trace["layers"][layer]
    T_all = len(tokens)
    if T_all != record["z"].shape[0]:
        raise ValueError(f"{T_all} tokens for a trace of {record['z'].shape[0]} steps; they must match")
    T = min(T_all, max_tokens)
    z = np.asarray(record["z"])[:T].T  # (H, T)
    r = np.asarray(record["r"])[:T].T  # (H, T)
    H = z.shape[0]
    layer_no = (layer % len(trace["layers"])) + 1
    head = title or "GRU gates"
    note = f" (first {T} of {T_all} tokens)" if T < T_all else ""
    width = min(20.0, max(9.0, 0.09 * T + 3.0))
    fig = plt.figure(figsize=(width, 8.0))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.6], width_ratios=[1, 0.012], wspace=0.02)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in (1, 2)]
    extent = (-0.5, T - 0.5, H - 0.5, -0.5)
    for row, (values, cmap, label) in enumerate((
        (z, "RdBu", "update gate z  (blue ≈ 1: keep the state · red ≈ 0: rewrite it)"),
        (r, "PiYG", "reset gate r  (green ≈ 1: use the old state · pink ≈ 0: reset)"),
    )):
        ax = axes[row]
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=extent)
        ax.set_ylabel("unit")
        ax.set_title(label, fontsize=10, loc="left")
        ax.tick_params(labelbottom=False)
        fig.colorbar(im, cax=fig.add_subplot(grid[row, 1]))
    steps = np.arange(T)
    axes[2].plot(steps, z.mean(0), color="#1d58a0", lw=1.6, label="mean z")
    axes[2].plot(steps, r.mean(0), color="#2d6e28", lw=1.2, ls="--", label="mean r")
    axes[2].set_ylim(0, 1)
    axes[2].set_ylabel("mean over units")
    axes[2].legend(loc="upper right", fontsize=8, frameon=False, ncol=2)
    axes[2].spines[["top", "right"]].set_visible(False)
    if T <= 100:
        axes[2].set_xticks(steps)
        axes[2].set_xticklabels([_visible(t) for t in tokens[:T]], fontsize=8, family="monospace")
    else:
        axes[2].set_xlabel("time step")
    fig.suptitle(f"{head}: layer {layer_no} of {len(trace['layers'])}, {H} units{note}", fontsize=12)
    fig.subplots_adjust(left=0.06, right=0.96, top=0.92, bottom=0.1, hspace=0.28)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


# ---------------------------------------------------------------------------
# The entry point of ``grulab viz``
# ---------------------------------------------------------------------------

_HTML_SUFFIXES = (".html", ".htm")
_PNG_SUFFIXES = (".png",)


def _tokenize(text: str, level: str) -> list[str]:
    """Characters, or words with grulab.data's word rule (whitespace split as a fallback)."""
    if level == "char":
        return list(text)
    try:
        from .data import tokenize
    except ImportError:  # pragma: no cover - grulab.data is part of the package
        return text.split()
    return tokenize(text, "word")


def _token_name(vocab, i: int) -> str:
    """The token string of one id, from ``idx_to_token`` or ``decode``."""
    names = getattr(vocab, "idx_to_token", None)
    if names is not None:
        return str(names[i])
    return str(vocab.decode([i]))


def render(model, vocab, text: str, out_path: PathLike, title: Optional[str] = None) -> Path:
    """Trace ``model`` over ``text`` and write ``out_path``: an .html page or a .png heatmap.

    ``vocab`` needs ``encode(list_of_tokens) -> list[int]``, ``len()``, and
    ``idx_to_token`` or ``decode([id])``; its ``level`` ("char", the default,
    or "word") says how ``text`` is split. Tokens the vocabulary does not know
    are read as <unk> (with a warning) and still shown as written.

    Raises GrulabError (one line) for an unsupported suffix, an empty text or
    a model that is not a GRU.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in _HTML_SUFFIXES + _PNG_SUFFIXES:
        raise GrulabError(
            f"cannot write {out_path.name!r}: the output must end in .html (interactive page) "
            f"or .png (heatmap), not {suffix or 'nothing'!r}"
        )
    _check_gru(model)
    level = getattr(vocab, "level", "char")
    tokens = _tokenize(text or "", level)
    if not tokens:
        raise GrulabError("the text to visualise is empty; give some text with --text or --file")

    ids = [int(i) for i in vocab.encode(tokens)]
    unk = int(getattr(vocab, "unk", 0))
    unknown = [i == unk and tok != "<unk>" for tok, i in zip(tokens, ids)]
    if any(unknown):
        missing = list(dict.fromkeys(tok for tok, u in zip(tokens, unknown) if u))
        shown = ", ".join(repr(t) for t in missing[:10]) + (", ..." if len(missing) > 10 else "")
        warnings.warn(
            f"{sum(unknown)} of {len(tokens)} tokens are not in the model's vocabulary "
            f"and are read as <unk>: {shown}",
            stacklevel=2,
        )

    trace = trace_gates(model, ids)
    trace["top_tokens"] = [[_token_name(vocab, i) for i in row] for row in trace["top_ids"].tolist()]
    if title is None:
        title = "What the GRU's gates do"
    if suffix in _PNG_SUFFIXES:
        return write_gate_png(trace, tokens, out_path, title=title)
    return write_gate_html(
        trace, tokens, out_path, title, joiner="" if level == "char" else " ", unknown=unknown
    )
