"""Chinese in every figure: the CJK fonts found are fallbacks for whatever the figure's font lacks;
without any, one warning that names the fix instead of one line per character. And the gate
heatmap: units in a documented order, tokens labelled as far as they fit, nothing clipped.
"""
from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch

from grulab.lm import plots
from grulab.views import plots as view_plots
from grulab.views import viz
from grulab.lm.data import Vocab, load_corpus
from grulab.lm.model import LanguageModel, ModelConfig

POEM = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, one_thread):
    """Each test may see the once-per-process warning, and leaves matplotlib's fonts as it found them."""
    monkeypatch.setattr(plots, "_missing_told", False)
    with matplotlib.rc_context():
        yield


def chinese_model() -> tuple[LanguageModel, Vocab]:
    vocab = Vocab(list(load_corpus("tang300")[:3000] + POEM))
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=len(vocab), hidden=24, embed=8)), vocab


def glyph_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message) or "empty boxes" in str(w.message)]


def sweep_results() -> list[dict]:
    rows = lambda scale: [dict(epoch=e, elapsed=2.0 * e, val_ppl=scale * 100 / e) for e in (1, 2, 3)]  # noqa: E731
    return [dict(run=f"hidden={h}", rows=rows(1 + 1 / h)) for h in (64, 128)]


def test_a_chinese_heatmap_and_sweep_plot_have_every_glyph(tmp_path):
    if not plots.cjk_fonts():
        pytest.skip(f"no CJK font on this machine ({plots.CJK_FIX})")
    model, vocab = chinese_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = viz.render(model, vocab, POEM * 3, tmp_path / "gates.png", title="门控循环单元的门")
        plots.compare_curves(sweep_results(), tmp_path / "sweep.png", title="超参数：隐藏单元数",
                             xlabels=("迭代周期", "时间（秒）"), ylabel="验证困惑度",
                             names={"hidden=64": "隐藏单元 64", "hidden=128": "隐藏单元 128"})
        plots.perplexity_curve([dict(epoch=1, train_ppl=9.0, val_ppl=10.0)], tmp_path / "ppl.png")
    assert glyph_warnings(caught) == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "sweep.png").stat().st_size > 10_000


def test_without_a_cjk_font_one_warning_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "cjk_fonts", lambda: ())
    matplotlib.rcParams["font.family"] = ["sans-serif"]
    model, vocab = chinese_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viz.render(model, vocab, POEM, tmp_path / "gates.png")
        plots.compare_curves(sweep_results(), tmp_path / "sweep.png", title="超参数")
    told = glyph_warnings(caught)
    assert len(told) == 1, told  # one, for the whole process: not one per character, nor per figure
    assert "fonts-noto-cjk" in told[0] and "fonts-wqy-microhei" in told[0] and "床" in told[0]
    assert not any("Glyph" in m for m in told)


def test_other_warnings_pass_through_the_glyph_filter():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with plots.one_glyph_warning():
            warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]


def test_the_cjk_fonts_are_fallbacks_after_the_figures_own():
    family = plots.use_cjk_fonts()
    assert list(matplotlib.rcParams["font.family"][: 1]) == [matplotlib.rcParamsDefault["font.family"][0]]
    assert list(matplotlib.rcParams["font.family"][-len(family):] if family else []) == list(family)
    assert plots.with_cjk("monospace")[0] == "monospace"
    assert plots._rank({"WenQuanYi Micro Hei", "Noto Sans CJK JP", "Noto Sans CJK SC", "DejaVu Sans"}) == \
        ["Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Micro Hei"]


def test_heatmap_units_are_sorted_by_mean_z():
    z = np.array([[0.1, 0.9, 0.5], [0.3, 0.7, 0.5]])  # (T, H): unit 1 keeps most, unit 0 least
    assert view_plots.unit_order(z).tolist() == [1, 2, 0]
    assert view_plots.label_every(50, 17.5) == 1 and view_plots.label_every(200, 17.5) == 2 and view_plots.label_every(1, 0.0) == 1


def test_heatmap_of_a_long_text_labels_every_kth_token(tmp_path):
    model, vocab = chinese_model()
    import matplotlib.pyplot as plt

    saved = []
    monkey = plt.Figure.savefig

    def keep(fig, *a, **k):  # look at the figure as it is saved
        means = [a for a in fig.axes if a.get_ylabel() == "mean over units"][0]
        saved.append(([t.get_text() for t in means.get_xticklabels()], means.get_xlabel(),
                      [a.get_ylabel() for a in fig.axes], k.get("bbox_inches")))
        return monkey(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        viz.render(model, vocab, (POEM * 20)[:200], tmp_path / "long.png")
        viz.render(model, vocab, POEM[:20], tmp_path / "short.png")
    finally:
        plt.Figure.savefig = monkey
    (long_labels, long_x, ylabels, bbox), (short_labels, short_x, _, _) = saved
    assert short_labels == [view_plots._visible(c) for c in POEM[:20]] and short_x == "token"
    assert long_labels[:3] == [view_plots._visible(c) for c in (POEM * 20)[0:6:2]] and "every 2 steps" in long_x
    assert "unit (sorted by mean z ↓)" in ylabels and bbox == "tight"  # the order named; nothing cut off
