"""grulab.views.viz: the gate trace, the HTML page, the PNG heatmap and render().

The browser tests drive headless Chromium (Debian's ``chromium`` package) with
Playwright's Python package; they are skipped where either is missing.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grulab.errors import GrulabError
from grulab.lm.model import LanguageModel, ModelConfig
from grulab.views import viz

TEXT = 'It is a truth, "universally" <acknowledged> & so on.\nA single man—in\tpossession…'


class TinyVocab:
    """The duck-typed interface render() needs: level, encode, idx_to_token, len, unk."""

    level = "char"
    unk = 0

    def __init__(self, text: str) -> None:
        self.idx_to_token = ["<unk>"] + sorted(set(text))
        self._index = {t: i for i, t in enumerate(self.idx_to_token)}

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def encode(self, tokens) -> list[int]:
        return [self._index.get(t, 0) for t in tokens]

    def decode(self, ids) -> str:
        return "".join(self.idx_to_token[i] for i in ids)


def make_model(vocab_size: int, cell: str = "gru", layers: int = 1, hidden: int = 12, **kw) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=vocab_size, cell=cell, hidden=hidden, layers=layers, **kw))


@pytest.fixture(scope="module")
def vocab() -> TinyVocab:
    return TinyVocab(TEXT)


@pytest.fixture(scope="module")
def html_page(tmp_path_factory, vocab) -> Path:
    model = make_model(len(vocab), layers=2)
    return viz.render(model, vocab, TEXT, tmp_path_factory.mktemp("viz") / "gates.html")


# -- trace ---------------------------------------------------------------------


@pytest.mark.parametrize("layers,reset_after,embed", [(1, True, 0), (2, True, 0), (3, False, 8)])
def test_trace_matches_forward(layers, reset_after, embed):
    model = make_model(17, layers=layers, reset_after=reset_after, embed=embed, dropout=0.2 if layers > 1 else 0.0)
    model.train()  # the trace must switch dropout off by itself, and restore the mode
    ids = torch.randint(0, 17, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    trace = viz.trace_gates(model, ids)
    assert model.training

    model.eval()
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]))  # (1, T, V), (L, 1, H)
        out, _ = model.rnn(model.inputs(torch.tensor(ids)[:, None]))  # (T, 1, H)
    assert len(trace["layers"]) == layers
    for name in ("r", "z", "n", "h"):
        assert trace["layers"][0][name].shape == (40, 12)
    top_h = torch.from_numpy(trace["layers"][-1]["h"])
    torch.testing.assert_close(top_h, out[:, 0], rtol=1e-4, atol=1e-5)
    for k, layer in enumerate(trace["layers"]):
        torch.testing.assert_close(torch.from_numpy(layer["h"][-1]), state[k, 0], rtol=1e-4, atol=1e-5)
    probs = torch.softmax(logits[0], -1)  # (T, V)
    expected_p, expected_i = probs.topk(5, -1)
    assert trace["top_ids"].shape == (40, 5)
    np.testing.assert_array_equal(trace["top_ids"], expected_i.numpy())
    np.testing.assert_allclose(trace["top_probs"], expected_p.numpy(), rtol=1e-4, atol=1e-6)
    z = trace["layers"][0]["z"]
    assert ((z > 0) & (z < 1)).all()


def test_trace_rejects_non_gru_and_empty():
    with pytest.raises(ValueError, match="GRU"):
        viz.trace_gates(make_model(5, cell="lstm"), [1, 2])
    with pytest.raises(ValueError, match="empty"):
        viz.trace_gates(make_model(5), [])


def test_gate_saturation_hand_made():
    gate = np.array(
        [  # T=5 steps, H=3 units
            [0.05, 0.95, 0.5],
            [0.05, 0.95, 0.1],  # exactly 0.1 is not < 0.1
            [0.50, 0.99, 0.9],  # exactly 0.9 is not > 0.9
            [0.00, 0.20, 0.91],
            [0.95, 0.05, 0.09],
        ]
    )
    left, right = viz.gate_saturation(gate)
    np.testing.assert_allclose(left, [3 / 5, 1 / 5, 1 / 5])
    np.testing.assert_allclose(right, [1 / 5, 3 / 5, 1 / 5])
    with pytest.raises(ValueError):
        viz.gate_saturation(np.zeros((0, 3)))


# -- HTML ------------------------------------------------------------------------


def _page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="gate-data">(.*?)</script>', page, re.S)
    assert m, "no embedded data block"
    return json.loads(m.group(1))


def test_html_is_self_contained(html_page: Path):
    page = html_page.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Nothing to fetch: no network URL anywhere, no src=/href= at all, no @import or url().
    assert not re.search(r"https?://", page)
    assert not re.search(r"""\b(src|href)\s*=""", page, re.I)
    assert "@import" not in page and "url(" not in page
    data = _page_data(page)
    # Every character of the text is in the page, in order, as one token each.
    assert "".join(data["tokens"]) == TEXT
    assert len(data["layers"]) == 2
    layer = data["layers"][-1]
    assert len(layer["z"]) == len(TEXT) * layer["H"]
    assert len(layer["z_sat"]["left"]) == layer["H"]
    assert all(len(row) == 5 for row in data["top"])


def test_html_saturation_matches_trace(tmp_path, vocab):
    model = make_model(len(vocab))
    ids = vocab.encode(list(TEXT))
    trace = viz.trace_gates(model, ids)
    out = viz.write_gate_html(trace, list(TEXT), tmp_path / "g.html", title="t <b>")
    data = _page_data(out.read_text(encoding="utf-8"))
    left, right = viz.gate_saturation(trace["layers"][0]["r"])
    np.testing.assert_allclose(data["layers"][0]["r_sat"]["left"], left, atol=1e-4)
    np.testing.assert_allclose(data["layers"][0]["r_sat"]["right"], right, atol=1e-4)
    assert "t &lt;b&gt;" in out.read_text(encoding="utf-8")  # the title is escaped


def test_html_cannot_be_broken_by_a_script_tag(tmp_path):
    tokens = list("</script><script>alert(1)</script>")
    V = len(set(tokens)) + 1
    index = {t: i + 1 for i, t in enumerate(sorted(set(tokens)))}
    trace = viz.trace_gates(make_model(V), [index[t] for t in tokens])
    page = viz.write_gate_html(trace, tokens, tmp_path / "x.html").read_text(encoding="utf-8")
    assert page.count("</script>") == 2  # the data block's and the code's, nothing from the text
    assert "".join(_page_data(page)["tokens"]) == "".join(tokens)


# -- PNG --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [30, 260])  # labelled tokens; capped at 200 with a note
def test_png_written(tmp_path, vocab, n):
    text = (TEXT * 4)[:n]
    out = viz.render(make_model(len(vocab)), vocab, text, tmp_path / "gates.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# -- render() errors ---------------------------------------------------------------


def test_render_errors(tmp_path, vocab):
    model = make_model(len(vocab))
    with pytest.raises(GrulabError, match=r"\.html.*\.png"):
        viz.render(model, vocab, TEXT, tmp_path / "gates.svg")
    with pytest.raises(GrulabError, match=r"\.html.*\.png"):
        viz.render(model, vocab, TEXT, tmp_path / "gates")
    with pytest.raises(GrulabError, match="empty"):
        viz.render(model, vocab, "", tmp_path / "gates.html")
    for cell in ("lstm", "rnn"):
        with pytest.raises(GrulabError, match="GRU"):
            viz.render(make_model(len(vocab), cell=cell), vocab, TEXT, tmp_path / "gates.html")
    assert not list(tmp_path.iterdir())  # nothing written on error


def test_render_unknown_tokens_warn(tmp_path, vocab):
    model = make_model(len(vocab))
    with pytest.warns(UserWarning, match="<unk>.*'Z'"):
        out = viz.render(model, vocab, "a Zest", tmp_path / "g.html")
    data = _page_data(out.read_text(encoding="utf-8"))
    assert "".join(data["tokens"]) == "a Zest"  # shown as written
    assert data["unknown"] == [False, False, True, False, False, False]


def test_render_with_grulab_vocab(tmp_path):
    data_mod = pytest.importorskip("grulab.lm.data")
    for level, joiner in (("char", ""), ("word", " ")):
        vocab = data_mod.Vocab(TEXT, level=level)
        model = make_model(len(vocab))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every token is known
            out = viz.render(model, vocab, TEXT, tmp_path / f"{level}.html")
        data = _page_data(out.read_text(encoding="utf-8"))
        assert data["joiner"] == joiner
        assert data["tokens"] == data_mod.tokenize(TEXT, level)
        assert all(tok in vocab.idx_to_token for row in data["top"] for tok, _ in row)


# -- in a browser ------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="browser tests need Playwright: pip install playwright (its driver is bundled; "
        "do not run `playwright install`, the tests use Debian's chromium)",
    )
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("browser tests need Chromium: apt-get install -y chromium")
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, path: Path):
    """A new tab on ``path``: (page, page errors, requested URLs)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("#text .tok")
    return page, errors, requests


@pytest.fixture(scope="module")
def browser_page(browser, html_page):
    return _open(browser, html_page)


def test_browser_renders_every_character(browser_page):
    page, errors, requests = browser_page
    assert errors == []
    assert [u for u in requests if not u.startswith("file://")] == []
    assert page.title() == "What the GRU's gates do"
    # textContent keeps every character, the newline and tab included.
    assert page.eval_on_selector("#text", "el => el.textContent") == TEXT
    rendered = page.inner_text("#text")
    for ch in set(TEXT) - {"\n", "\t", " "}:
        assert ch in rendered
    assert page.locator("#text .tok").count() == len(TEXT)
    assert page.locator("#text .tok.nl").count() == TEXT.count("\n")
    assert page.locator("#sat-z circle").count() == 12  # one dot per unit
    assert page.is_visible("#layer")  # two layers -> a layer selector


def test_browser_tooltip(browser_page, vocab):
    page, _, _ = browser_page
    t = TEXT.index("u")  # the "u" of "truth"
    page.locator("#text .tok").nth(t).hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    content = tip.inner_text()
    assert f"position {t + 1} of {len(TEXT)}" in content
    assert re.search(r"z = 0\.\d{3}", content) and re.search(r"r = 0\.\d{3}", content)
    assert len(re.findall(r"\d+\.\d%", content)) == 5  # five next-token probabilities
    assert page.locator("#tooltip tr").count() == 5

    # The newline is shown visibly in its tooltip.
    page.locator("#text .tok.nl").first.hover()
    assert "\u23ce" in page.locator("#tooltip .ch").inner_text()
    page.mouse.move(1, 1)
    page.locator("header h1").hover()
    assert page.locator("#tooltip").is_hidden()


def test_browser_switches_gate_unit_and_layer(browser_page):
    page, errors, _ = browser_page
    colours = lambda: page.eval_on_selector_all("#text .tok", "els => els.map(e => e.style.backgroundColor)")
    before = colours()
    assert all(c.startswith("rgb") for c in before)
    page.check("#gate-r")
    after_r = colours()
    assert after_r != before
    page.check("#gate-z")
    assert colours() == before

    # One unit instead of the mean.
    page.fill("#unitnum", "3")
    assert not page.is_checked("#mean")
    unit3 = colours()
    assert unit3 != before
    page.locator("#text .tok").nth(5).hover()
    assert "unit 3" in page.locator("#tooltip").text_content()
    page.check("#mean")
    assert colours() == before

    # The bottom layer.
    page.select_option("#layer", "0")
    assert colours() != before
    page.select_option("#layer", "1")
    assert colours() == before
    assert errors == []


# -- minGRU: one gate, z, which writes at 1 -------------------------------------------


@pytest.mark.parametrize("cell", ["mingru", "mingru-block"])
def test_mingru_trace_matches_forward(cell):
    model = make_model(17, cell=cell, layers=2, embed=6, dropout=0.2)
    model.train()  # the trace switches dropout off by itself, and restores the mode
    ids = torch.randint(0, 17, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    trace = viz.trace_gates(model, ids)
    assert model.training
    assert trace["gates"] == ("z",) and trace["z_writes"] and trace["cell"] == cell
    assert len(trace["layers"]) == 2 and "r" not in trace["layers"][0]
    model.eval()
    x = model.inputs(torch.tensor(ids)[:, None])  # (T, 1, I)
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]))
        h_n = state[0] if cell == "mingru-block" else state  # (L, 1, H)
        if cell == "mingru":  # layer 1's z from its weights, independently: σ(x W_z^T + b_z)
            W, b = model.rnn.weight_ih_l0, model.rnn.bias_ih_l0
            z0 = torch.sigmoid(x[:, 0] @ W[:12].t() + b[:12])  # (T, H)
            torch.testing.assert_close(torch.from_numpy(trace["layers"][0]["z"]), z0, rtol=1e-5, atol=1e-6)
            out, _ = model.rnn(x)
            torch.testing.assert_close(torch.from_numpy(trace["layers"][-1]["h"]), out[:, 0], rtol=1e-5, atol=1e-6)
    for k, layer in enumerate(trace["layers"]):
        assert layer["z"].shape == (30, 12) and ((layer["z"] > 0) & (layer["z"] < 1)).all()
        torch.testing.assert_close(torch.from_numpy(layer["h"][-1]), h_n[k, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trace["top_ids"], torch.softmax(logits[0], -1).topk(5, -1).indices.numpy())


@pytest.fixture(scope="module")
def mingru_page(tmp_path_factory, vocab) -> Path:
    model = make_model(len(vocab), cell="mingru", layers=2)
    return viz.render(model, vocab, TEXT, tmp_path_factory.mktemp("viz") / "mingru.html")


def test_mingru_page_and_png(mingru_page, tmp_path, vocab):
    page = mingru_page.read_text(encoding="utf-8")
    data = _page_data(page)
    assert data["gates"] == ["z"] and data["z_writes"] and data["cell"] == "mingru"
    assert "r" not in data["layers"][0] and "r_sat" not in data["layers"][0]
    assert "What the minGRU" in page and "opposite of the GRU" in page
    png = viz.render(make_model(len(vocab), cell="mingru-block"), vocab, TEXT[:40], tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_mingru_page(browser, mingru_page, vocab):
    page, errors, requests = _open(browser, mingru_page)
    try:
        assert errors == [] and [u for u in requests if not u.startswith("file://")] == []
        assert page.is_hidden("#gate-r") and page.is_hidden("#sat-r")  # no reset gate
        assert page.is_visible("#z-writes-note") and page.locator("#sat-z circle").count() == 12
        assert "writes" in page.inner_text("#legend-text") and "opposite" in page.inner_text("#legend-text")
        page.keyboard.press("r")  # no r gate to switch to: nothing changes, nothing breaks
        t = TEXT.index("u")
        page.locator("#text .tok").nth(t).hover()
        tip = page.locator("#tooltip")
        tip.wait_for(state="visible")
        content = tip.inner_text()
        z = float(re.search(r"z = (0\.\d{3})", content).group(1))
        assert ("(writes)" if z > 0.5 else "(keeps)") in content and "r =" not in content
        page.fill("#unitnum", "3")
        assert "unit 3" in page.inner_text("#unitinfo") and "reset gate" not in page.inner_text("#unitinfo")
        assert errors == []
    finally:
        page.close()

# The child's own peak: VmHWM, its memory map's high-water mark. Not getrusage's ru_maxrss, which
# Linux carries across exec from the parent's map (a pytest process that once held 1.4 GB made this
# child "use" 1.4 GB).
VIZ_200KB = """
import resource, sys
from grulab.cli import main
code = main(["viz", sys.argv[1], "--file", sys.argv[2], "--out", sys.argv[3]])
try:
    with open("/proc/self/status") as f:
        print(next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")))  # kB
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
sys.exit(code)
"""


def test_a_200kb_text_gives_a_capped_page_in_bounded_memory(tmp_path):
    """Issue 11: 200 KB of text made a 553 MB page with 7.4 GB peak memory; now the page is cut, with a warning."""
    import os
    import subprocess
    import sys

    from grulab.lm import checkpoint
    from grulab.lm.data import Vocab

    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 2200)[:200_000]
    vocab = Vocab(text)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=len(vocab), hidden=384, embed=0))  # the default width
    checkpoint.save(tmp_path / "run", model, vocab, {}, {})
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    page = tmp_path / "gates.html"
    proc = subprocess.run([sys.executable, "-c", VIZ_200KB, str(tmp_path / "run"), str(tmp_path / "text.txt"), str(page)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    limit = viz.max_tokens(384)
    assert proc.stderr.splitlines() == [
        f"warning: the text has 200,000 tokens; the page shows the first {limit:,} (at most 10,000, and under 20 MB of "
        "page for this 1×384 GRU); give a shorter passage to see another part"]
    assert 10e6 < page.stat().st_size < 20e6
    assert int(proc.stdout.splitlines()[-1]) < 1e9
