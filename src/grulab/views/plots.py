"""The views' figures: a GRU's (or minGRU's) gates over a text, and the cat/mouse demo.

    gate_heatmap(trace, tokens, "gates.png")       # grulab viz
    catmouse_figure(result, "catmouse.png")        # grulab demo cat-mouse

Fonts, the Agg backend and the one-warning rule for missing glyphs: :mod:`grulab.lm.plots`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from grulab.lm.plots import PathLike, figure, pyplot, with_cjk

#: The gate heatmap shows at most this many tokens.
PNG_MAX_TOKENS = 200


def _visible(token: str) -> str:
    """A token as it should appear on an axis: whitespace made visible."""
    return {"\n": "⏎", " ": "␣", "\t": "⇥", "\r": "\\r", "": "∅"}.get(token, token)


#: Widest the heatmap gets (inches), and the room one time-axis label needs at font size 8 (inches):
#: a character's, or a rotated word's line height.
HEATMAP_MAX_WIDTH = 20.0
LABEL_WIDTH = 0.14


def unit_order(z: np.ndarray) -> np.ndarray:
    """The order the heatmap shows the units in: by their mean update gate over the text, highest
    first (for a GRU, the units that keep their state the most on top, those that rewrite it at
    almost every step at the bottom). ``z`` (T, H) -> unit indices (H,); ties keep storage order."""
    return np.argsort(-np.asarray(z, dtype=np.float64).mean(axis=0), kind="stable")


def label_every(T: int, room: float) -> int:
    """k: label every k-th of T time steps so that the labels fit in ``room`` inches (1: all of them)."""
    fits = max(1, int(room / LABEL_WIDTH))
    return max(1, -(-T // fits))


@figure
def gate_heatmap(
    trace: dict,
    tokens: Sequence[str],
    out_path: PathLike,
    *,
    layer: int = -1,
    max_tokens: int = PNG_MAX_TOKENS,
    title: Optional[str] = None,
) -> Path:
    """A static heatmap of one layer's gates: z and r (units × time) and their means over the units.

    The units (rows) are sorted by :func:`unit_order`, their mean z over the shown tokens, highest
    first, the same order in both panels; the y axis names the units by their index in the layer.
    Every token labels the time axis while the labels fit the figure (its width grows with the text
    up to :data:`HEATMAP_MAX_WIDTH` inches), then every k-th (the axis says which k). Tokens are drawn
    in a monospaced font with the CJK fonts found (:func:`cjk_fonts`) to fall back on, so Chinese
    shows. A minGRU trace (``trace["z_writes"]``) has z only, and its z ≈ 1 writes the candidate:
    its colour map is reversed so that red writes and blue keeps for both cells, and the label says
    so. Shows the first ``max_tokens`` tokens (noted in the title when the text is longer).
    """
    plt = pyplot()
    record = trace["layers"][layer]
    T_all = len(tokens)
    if T_all != record["z"].shape[0]:
        raise ValueError(f"{T_all} tokens for a trace of {record['z'].shape[0]} steps; they must match")
    T = min(T_all, max_tokens)
    writes = bool(trace.get("z_writes"))
    order = unit_order(np.asarray(record["z"])[:T])  # (H,)
    z = np.asarray(record["z"])[:T].T[order]  # (H, T), rows sorted
    panels = [(z, "RdBu_r", "minGRU update gate z  (red ≈ 1: write the candidate · blue ≈ 0: keep the state; "
                            "the opposite of the GRU's z)") if writes else
              (z, "RdBu", "update gate z  (blue ≈ 1: keep the state · red ≈ 0: rewrite it)")]
    if "r" in record:
        r = np.asarray(record["r"])[:T].T[order]  # (H, T), the same rows
        panels.append((r, "PiYG", "reset gate r  (green ≈ 1: use the old state · pink ≈ 0: reset)"))
    H = z.shape[0]
    layer_no = (layer % len(trace["layers"])) + 1
    head = title or ("minGRU gate" if writes else "GRU gates")
    note = f" (first {T} of {T_all} tokens)" if T < T_all else ""
    shown = [_visible(t) for t in tokens[:T]]
    wide = max((len(t) for t in shown), default=1) > 2  # words: labels drawn upright, one line each
    width = min(HEATMAP_MAX_WIDTH, max(9.0, LABEL_WIDTH * T + 2.5))
    k = label_every(T, width - 2.5)
    n = len(panels)
    label_room = 0.12 * max(len(t) for t in shown) * 0.75 if wide else 0.0
    height = 3.0 * n + 2.2 + min(label_room, 1.2)  # 3 inches per heatmap; the means, labels and title
    fig = plt.figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[1] * n + [0.6], width_ratios=[1, 0.012])
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in range(1, n + 1)]
    extent = (-0.5, T - 0.5, H - 0.5, -0.5)
    rows = np.arange(H)[:: max(1, -(-H // 16))]  # at most 16 unit names per panel
    for row, (values, cmap, label) in enumerate(panels):
        ax = axes[row]
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=extent)
        ax.set_ylabel("unit (sorted by mean z ↓)", fontsize=9)
        ax.set_yticks(rows, [str(u) for u in order[rows]], fontsize=7)
        ax.set_title(label, fontsize=10, loc="left")
        ax.tick_params(labelbottom=False)
        fig.colorbar(im, cax=fig.add_subplot(grid[row, 1]))
    steps, means = np.arange(T), axes[n]
    means.plot(steps, z.mean(0), color="#1d58a0", lw=1.6, label="mean z" + (" (1 = write)" if writes else ""))
    if "r" in record:
        means.plot(steps, r.mean(0), color="#2d6e28", lw=1.2, ls="--", label="mean r")
    means.set_ylim(0, 1)
    means.set_ylabel("mean over units", fontsize=9)
    means.legend(loc="upper right", fontsize=8, frameon=False, ncol=2)
    means.spines[["top", "right"]].set_visible(False)
    means.set_xlim(-0.5, T - 0.5)
    means.set_xticks(steps[::k], shown[::k], fontsize=8, family=with_cjk("monospace"),
                     rotation=90 if wide else 0)
    means.set_xlabel("token" if k == 1 else f"token (one label every {k} steps: 0, {k}, {2 * k}, …)", fontsize=9)
    fig.suptitle(f"{head}: layer {layer_no} of {len(trace['layers'])}, {H} units{note}", fontsize=12)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return out_path


@figure
def catmouse_figure(result: dict, out_path: PathLike) -> Path:
    """Two panels of ``grulab demo cat-mouse``: the GRU's update gate along one sequence, and accuracy
    against distance (``result`` as :func:`grulab.views.catmouse.run` returns it)."""
    plt = pyplot()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    gate = result["gate"]
    ex = gate["example"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.7, 1]})

    steps = range(len(ex["z"]))
    for zu in ex["z_units"]:
        ax1.plot(steps, zu, color="#9db4d0", lw=0.6, alpha=0.6)
    ax1.plot(steps, ex["z"], color="#1f4e8c", lw=2.2, label="mean z over units")
    k = ex["key_pos"]
    ax1.axvline(k, color="#d1495b", lw=1.5, ls="--")
    ax1.annotate(
        f"{ex['tokens'][k]}\n(z drops: rewrite)", xy=(k, ex["z"][k]), xytext=(k + 4, 0.12),
        color="#d1495b", arrowprops={"arrowstyle": "->", "color": "#d1495b"},
    )
    ax1.text(len(ex["z"]) * 0.55, 0.96, "cat cat cat …  (z ≈ 1: keep)", color="#1f4e8c", va="top", ha="center")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("time step")
    ax1.set_ylabel("update gate z")
    ax1.set_title(f"GRU update gate along one sequence (distance {gate['distance']}); thin: units")
    ax1.legend(loc="lower right", frameon=False)

    d = result["distances"]
    ax2.plot(d, result["accuracy"]["gru"], "o-", color="#1f4e8c", lw=2, label="GRU")
    ax2.plot(d, result["accuracy"]["rnn"], "s-", color="#e07a1f", lw=2, label="tanh RNN")
    ax2.axhline(result["chance"], color="grey", ls=":", label="chance")
    ax2.set_xscale("log")
    ax2.set_xticks(d, [str(v) for v in d])
    ax2.minorticks_off()
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("distance from key to answer (steps)")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("remembering the mouse")
    ax2.legend(frameon=False)
    for ax in (ax1, ax2):
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
