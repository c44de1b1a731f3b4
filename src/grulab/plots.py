"""Every figure grulab draws, with matplotlib on the Agg backend (no display needed).

    perplexity_curve(rows, "perplexity.png")       # grulab train: train and validation perplexity
    compare_curves(results, "perplexity.png")      # grulab compare: validation perplexity of every run
    gate_heatmap(trace, tokens, "gates.png")       # grulab viz: a GRU's (or minGRU's) gates over a text
    catmouse_figure(result, "catmouse.png")        # grulab demo cat-mouse
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

PathLike = Union[str, Path]

#: The gate heatmap shows at most this many tokens.
PNG_MAX_TOKENS = 200


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_axis(ax, xlabel: str, ylabel: str) -> None:
    """A log-scale perplexity axis with plain-number ticks, a grid and a legend."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend()


def perplexity_curve(rows: list[dict], png_path: PathLike) -> Optional[Path]:
    """Training and validation perplexity against epoch (rows of metrics.jsonl), as a PNG."""
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [r["train_ppl"] for r in rows], marker="o", label="train")
    ax.plot([r["epoch"] for r in rows], [r["val_ppl"] for r in rows], marker="o", label="validation")
    perplexity_axis(ax, "epoch", "perplexity")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def compare_curves(results: list[dict], path: PathLike) -> Path:
    """Validation perplexity of every run of ``grulab compare``, against epoch and against wall time."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        rows = r["rows"]
        a.plot([x["epoch"] for x in rows], [x["val_ppl"] for x in rows], marker="o", label=r["run"])
        b.plot([x["elapsed"] for x in rows], [x["val_ppl"] for x in rows], marker="o", label=r["run"])
    perplexity_axis(a, "epoch", "validation perplexity")
    perplexity_axis(b, "wall time (s)", "validation perplexity")
    fig.suptitle("validation perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _visible(token: str) -> str:
    """A token as it should appear on an axis: whitespace made visible."""
    return {"\n": "⏎", " ": "␣", "\t": "⇥", "\r": "␍", "": "∅"}.get(token, token)


def gate_heatmap(
    trace: dict,
    tokens: Sequence[str],
    out_path: PathLike,
    *,
    layer: int = -1,
    max_tokens: int = PNG_MAX_TOKENS,
    title: Optional[str] = None,
) -> Path:
    """A static heatmap of one layer's gates: z and r (units × time) and their means.

    A minGRU trace (``trace["z_writes"]``) has z only, and its z ≈ 1 writes the
    candidate: its colour map is reversed so that red writes and blue keeps for
    both cells, and the label says so. Shows the first ``max_tokens`` tokens (noted in the title when the text is
    longer); the tokens label the time axis when there are at most 100.
    """
    plt = pyplot()
    record = trace["layers"][layer]
    T_all = len(tokens)
    if T_all != record["z"].shape[0]:
        raise ValueError(f"{T_all} tokens for a trace of {record['z'].shape[0]} steps; they must match")
    T = min(T_all, max_tokens)
    writes = bool(trace.get("z_writes"))
    z = np.asarray(record["z"])[:T].T  # (H, T)
    panels = [(z, "RdBu_r", "minGRU update gate z  (red ≈ 1: write the candidate · blue ≈ 0: keep the state; "
                            "the opposite of the GRU's z)") if writes else
              (z, "RdBu", "update gate z  (blue ≈ 1: keep the state · red ≈ 0: rewrite it)")]
    if "r" in record:
        r = np.asarray(record["r"])[:T].T  # (H, T)
        panels.append((r, "PiYG", "reset gate r  (green ≈ 1: use the old state · pink ≈ 0: reset)"))
    H = z.shape[0]
    layer_no = (layer % len(trace["layers"])) + 1
    head = title or ("minGRU gate" if writes else "GRU gates")
    note = f" (first {T} of {T_all} tokens)" if T < T_all else ""
    width = min(20.0, max(9.0, 0.09 * T + 3.0))
    n = len(panels)
    height = 3.0 * n + 2.0  # 3 inches per heatmap, 2 for the means and the title
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[1] * n + [0.6], width_ratios=[1, 0.012], wspace=0.02)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in range(1, n + 1)]
    extent = (-0.5, T - 0.5, H - 0.5, -0.5)
    for row, (values, cmap, label) in enumerate(panels):
        ax = axes[row]
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=extent)
        ax.set_ylabel("unit")
        ax.set_title(label, fontsize=10, loc="left")
        ax.tick_params(labelbottom=False)
        fig.colorbar(im, cax=fig.add_subplot(grid[row, 1]))
    steps, means = np.arange(T), axes[n]
    means.plot(steps, z.mean(0), color="#1d58a0", lw=1.6, label="mean z" + (" (1 = write)" if writes else ""))
    if "r" in record:
        means.plot(steps, r.mean(0), color="#2d6e28", lw=1.2, ls="--", label="mean r")
    means.set_ylim(0, 1)
    means.set_ylabel("mean")
    means.legend(loc="upper right", fontsize=8, frameon=False, ncol=2)
    means.spines[["top", "right"]].set_visible(False)
    if T <= 100:
        means.set_xticks(steps)
        means.set_xticklabels([_visible(t) for t in tokens[:T]], fontsize=8, family="monospace")
    else:
        means.set_xlabel("time step")
    fig.suptitle(f"{head}: layer {layer_no} of {len(trace['layers'])}, {H} units{note}", fontsize=12)
    fig.subplots_adjust(left=0.06, right=0.96, top=1 - 0.7 / height, bottom=0.55 / height, hspace=0.28)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def catmouse_figure(result: dict, out_path: PathLike) -> Path:
    """Two panels of ``grulab demo cat-mouse``: the GRU's update gate along one sequence, and accuracy
    against distance (``result`` as :func:`grulab.catmouse.run` returns it)."""
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
