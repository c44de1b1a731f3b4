"""The language model's figures, and what every grulab figure shares: matplotlib on the Agg
backend (no display needed), with a CJK font where the system has one.

    perplexity_curve(rows, "perplexity.png")       # grulab train: train and validation perplexity
    compare_curves(results, "perplexity.png")      # grulab compare: validation perplexity of every run

The views' figures (the gate heatmap, cat/mouse) are in :mod:`grulab.views.plots`.
"""
from __future__ import annotations

import functools
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, Path]

#: Fonts with Chinese characters, best first, by the start of their family name. matplotlib falls
#: back to them, in this order, for every character the figure's own font lacks.
CJK_FONTS = ("Noto Sans CJK", "Noto Serif CJK", "Noto Sans SC", "Noto Sans TC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "WenQuanYi", "Source Han Sans", "Source Han Serif", "PingFang",
             "Microsoft YaHei", "SimHei")
#: How to get one, said in the warning when none is installed.
CJK_FIX = ("install a CJK font: on Debian or Ubuntu apt-get install fonts-noto-cjk (or the smaller "
           "fonts-wqy-microhei); elsewhere any of " + ", ".join(dict.fromkeys(
               ["Noto Sans CJK", "WenQuanYi", "Source Han Sans", "PingFang", "Microsoft YaHei", "SimHei"])))
# font files of CJK_FONTS, to find one installed after matplotlib cached its list of fonts
_CJK_FILE = re.compile(r"wqy|wenquanyi|notosanscjk|notoserifcjk|notosans(sc|tc)|sourcehan|pingfang|msyh|simhei")
_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


def _rank(names) -> list[str]:
    """The CJK font families among ``names``, in the order of :data:`CJK_FONTS` (Simplified first)."""
    found = []
    for start in CJK_FONTS:
        found += sorted((n for n in names if n.startswith(start) and n not in found and "Mono" not in n),
                        key=lambda n: (" SC" not in n and not n.endswith("SC"), n))
    return found


@functools.lru_cache(maxsize=None)
def cjk_fonts() -> tuple[str, ...]:
    """The font families with Chinese characters that matplotlib can use here, best first; empty
    when there is none. A font installed after matplotlib cached its list of fonts is found on disk
    (once per process) and added."""
    from matplotlib import font_manager

    found = _rank({f.name for f in font_manager.fontManager.ttflist})
    if not found:
        for path in font_manager.findSystemFonts():
            if _CJK_FILE.search(Path(path).name.lower().replace("-", "").replace("_", "")):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # a file FreeType cannot read: skip it
                    continue
        found = _rank({f.name for f in font_manager.fontManager.ttflist})
    return tuple(found)


def use_cjk_fonts() -> tuple[str, ...]:
    """Append the CJK fonts found (:func:`cjk_fonts`) to matplotlib's ``font.family``, so that every
    figure drawn in this process shows Chinese, whatever its own font; returns them."""
    import matplotlib

    fonts = cjk_fonts()
    family = matplotlib.rcParams["font.family"]
    family = [family] if isinstance(family, str) else list(family)
    matplotlib.rcParams["font.family"] = family + [f for f in fonts if f not in family]
    return fonts


def with_cjk(family: str) -> list[str]:
    """A font family for a text drawn in its own font ("monospace"), with the CJK fonts to fall back on."""
    return [family, *cjk_fonts()]


_missing_told = False  # the missing-glyph warning is given once per process


@contextmanager
def one_glyph_warning() -> Iterator[None]:
    """Inside, matplotlib's warning per character no font has ("Glyph 24202 missing from font(s)
    DejaVu Sans", one line each) is gathered into one warning that names the fix (:data:`CJK_FIX`),
    given once per process. Other warnings pass on."""
    global _missing_told
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = []
    for w in caught:
        m = _GLYPH.search(str(w.message))
        if m:
            missing.append(chr(int(m.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    missing = list(dict.fromkeys(missing))
    if missing and not _missing_told:
        _missing_told = True
        shown = " ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        cause = ("no installed font has them" if cjk_fonts() else
                 "matplotlib found no font with Chinese characters")
        warnings.warn(f"{len(missing)} character(s) of the figure show as empty boxes ({shown}): {cause}; "
                      f"{CJK_FIX}", stacklevel=3)


def figure(draw):
    """A figure function, run with the CJK fonts and the one missing-glyph warning."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with one_glyph_warning():
            return draw(*args, **kwargs)
    return wrapper


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), with the CJK fonts found here as
    fallbacks for characters the figure's font lacks (:func:`use_cjk_fonts`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_cjk_fonts()
    return plt


def perplexity_axis(ax, xlabel: str, ylabel: str) -> None:
    """A log-scale perplexity axis with plain-number ticks, a grid and a legend.

    Every power of ten is labelled; the ticks between are labelled only while they have room
    (all of them within half a decade, a few up to two decades, none over more), so that no two labels
    overlap however far the perplexity falls (a long run: from hundreds to about 1).
    """
    from matplotlib.ticker import LogFormatter

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.grid(True, alpha=0.3)
    ax.legend()


@figure
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


@figure
def compare_curves(results: list[dict], path: PathLike, *, title: str = "validation perplexity",
                   xlabels: tuple[str, str] = ("epoch", "wall time (s)"), ylabel: str = "validation perplexity",
                   names: Optional[dict] = None) -> Path:
    """Validation perplexity of every run of ``grulab compare``, against epoch and against wall time.

    ``title``, ``xlabels``, ``ylabel`` and ``names`` (run -> its name in the legend) say it in another
    language, e.g. Chinese: every figure falls back on the CJK fonts found (:func:`cjk_fonts`)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = names or {}
    for r in results:
        rows, name = r["rows"], names.get(r["run"], r["run"])
        a.plot([x["epoch"] for x in rows], [x["val_ppl"] for x in rows], marker="o", label=name)
        b.plot([x["elapsed"] for x in rows], [x["val_ppl"] for x in rows], marker="o", label=name)
    perplexity_axis(a, xlabels[0], ylabel)
    perplexity_axis(b, xlabels[1], ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
