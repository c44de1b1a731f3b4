"""Tests for grulab.lm.data: corpora, download, tokens, vocabulary, minibatches.

Real files in tmp_path and a real HTTP server on 127.0.0.1; nothing is mocked
and nothing touches the internet.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grulab.lm import data
from grulab.lm.data import (
    CORPORA,
    UNK,
    Vocab,
    build_dataset,
    d2l_preprocess,
    d2l_zh_preprocess,
    download_timemachine,
    load_corpus,
    min_tokens,
    notes_preprocess,
    notes_rule,
    num_batches,
    random_batches,
    sequential_batches,
    split_train_val,
    tokenize,
)
from grulab.errors import GrulabError

CORPUS_DIR = Path(data.__file__).parent / "corpora"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Bundled corpora
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, chars, distinct, start",
    [
        ("austen", 684_768, 75, "PRIDE AND PREJUDICE"),
        ("tang300", 39_237, 2_842, "《感遇・其一》"),
        ("tang-qilu", 630_822, 5_170, "《過小妓英英墓》楊虞卿"),
    ],
)
def test_bundled_corpora_match_provenance(name, chars, distinct, start):
    text = load_corpus(name)
    assert len(text) == chars
    assert len(set(text)) == distinct
    assert text.startswith(start)
    assert "\r" not in text


def test_corpora_names_and_files():
    assert set(CORPORA) == {"austen", "tang300", "tang-qilu", "timemachine"}
    for fname in ("austen.txt.gz", "tang300.txt.gz", "tang-qilu.txt.gz", "PROVENANCE.md"):
        assert (CORPUS_DIR / fname).is_file(), fname
    # reproducible archives: no timestamp in the gzip header
    for gz in CORPUS_DIR.glob("*.gz"):
        assert gz.read_bytes()[4:8] == b"\x00\x00\x00\x00", gz


def test_load_corpus_from_path_normalizes_newlines_and_bom(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffhéllo\r\nworld\rend\n".encode("utf-8"))
    assert load_corpus(str(p)) == "héllo\nworld\nend\n"


# ---------------------------------------------------------------------------
# Bad input: every error names the offender
# ---------------------------------------------------------------------------

def _raises(arg, *fragments):
    with pytest.raises(GrulabError) as info:
        load_corpus(str(arg))
    msg = str(info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.txt", str(tmp_path / "nope.txt"), "not found")


def test_directory(tmp_path):
    _raises(tmp_path, str(tmp_path), "directory")


def test_empty_and_blank_file(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    _raises(tmp_path / "e.txt", str(tmp_path / "e.txt"), "empty")
    (tmp_path / "b.txt").write_bytes(b" \n\t\n")
    _raises(tmp_path / "b.txt", str(tmp_path / "b.txt"), "blank")


def test_binary_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc\x00def")
    _raises(p, str(p), "binary", "offset 3")


def test_non_utf8_file_reports_byte_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf".encode() + "é au lait".encode("latin-1"))
    _raises(p, str(p), "UTF-8", "0xe9", "offset 3")


def test_unknown_name_lists_known_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _raises("shakespeare", "'shakespeare'")
    for name in CORPORA:
        assert name in msg


# ---------------------------------------------------------------------------
# The Time Machine download, against a real local HTTP server
# ---------------------------------------------------------------------------

class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    body = b"The Time Traveller (for so it will be convenient to speak of him)\n" * 50
    (root / "timemachine.txt").write_bytes(body)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_CountingHandler, directory=str(root)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/timemachine.txt"
    yield httpd, url, body, hashlib.sha1(body).hexdigest()
    httpd.shutdown()
    httpd.server_close()


def test_download_then_cache(server, tmp_path):
    httpd, url, body, sha1 = server
    cache = tmp_path / "cache"
    path = download_timemachine(url=url, sha1=sha1, cache_dir=cache)
    assert path == cache / "timemachine.txt"
    assert path.read_bytes() == body
    assert httpd.requests == ["/timemachine.txt"]
    assert download_timemachine(url=url, sha1=sha1, cache_dir=cache) == path
    assert len(httpd.requests) == 1  # served from the cache
    assert sorted(p.name for p in cache.iterdir()) == ["timemachine.txt"]  # no temp files left


def test_corrupt_cache_is_replaced(server, tmp_path):
    httpd, url, body, sha1 = server
    (tmp_path / "timemachine.txt").write_bytes(b"truncated")
    path = download_timemachine(url=url, sha1=sha1, cache_dir=tmp_path)
    assert path.read_bytes() == body
    assert len(httpd.requests) == 1


def test_wrong_sha1_leaves_no_file(server, tmp_path):
    httpd, url, body, sha1 = server
    cache = tmp_path / "cache"
    with pytest.raises(GrulabError, match="sha1") as info:
        download_timemachine(url=url, sha1="0" * 40, cache_dir=cache)
    assert sha1 in str(info.value) and str(cache / "timemachine.txt") in str(info.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_http_error_is_clear(server, tmp_path):
    httpd, url, body, sha1 = server
    with pytest.raises(GrulabError, match="404"):
        download_timemachine(url=url.replace("timemachine", "missing"), sha1=sha1, cache_dir=tmp_path)


def test_unreachable_server_is_clear(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{port}/timemachine.txt"
    with pytest.raises(GrulabError) as info:
        download_timemachine(url=url, sha1="0" * 40, cache_dir=cache, timeout=5)
    msg = str(info.value)
    assert msg.startswith(f"could not download {url} (")
    assert f"check your network or put the file at {cache / 'timemachine.txt'}" in msg
    assert not cache.exists()


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRULAB_CACHE", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GRULAB_CACHE")
    assert data.default_cache_dir() == tmp_path / "x" / "grulab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.default_cache_dir() == tmp_path / "h" / ".cache" / "grulab"


def test_download_uses_grulab_cache_env(server, monkeypatch, tmp_path):
    httpd, url, body, sha1 = server
    monkeypatch.setenv("GRULAB_CACHE", str(tmp_path / "envcache"))
    assert download_timemachine(url=url, sha1=sha1) == tmp_path / "envcache" / "timemachine.txt"


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------

def test_tokenize_levels():
    assert tokenize("ab c\n", "char") == ["a", "b", " ", "c", "\n"]
    assert tokenize("Yes, don't!\n  Mr. Darcy's", "word") == ["Yes", ",", "don't", "!", "Mr", ".", "Darcy's"]
    with pytest.raises(GrulabError, match="'byte'"):
        tokenize("x", "byte")


def test_d2l_preprocess():
    text = "The Time Machine, by H. G. Wells [1898]\n\n\nI\nThe Time Traveller!"
    out = d2l_preprocess(text)
    assert out == "the time machine by h g wells i the time traveller"
    assert set(d2l_preprocess(load_corpus("austen"))) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert len(Vocab(d2l_preprocess(load_corpus("austen")))) == 28  # d2l's 26 letters + space + <unk>


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

def test_vocab_order_and_unk():
    v = Vocab("abracadabra")  # a:5 b:2 r:2 c:1 d:1
    assert v.idx_to_token == [UNK, "a", "b", "r", "c", "d"]
    assert v.unk == 0 and v[UNK] == 0 and len(v) == 6
    assert v["z"] == 0 and v[["a", "z"]] == [1, 0]
    assert v.encode("cab?") == [4, 1, 2, 0]


def test_vocab_min_freq_maps_rare_tokens_to_unk():
    v = Vocab("abracadabra", min_freq=2)
    assert v.idx_to_token == [UNK, "a", "b", "r"]
    assert v.encode("cad") == [0, 1, 0]
    assert v.decode(v.encode("cad")) == f"{UNK}a{UNK}"
    assert v.unknown_tokens("dacdx") == ["d", "c", "x"]
    with pytest.raises(GrulabError, match="min_freq"):
        Vocab("ab", min_freq=-1)


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_char_round_trip(text):
    v = Vocab(text)
    assert v.decode(v.encode(text)) == text
    assert v.unknown_tokens(text) == []
    assert v.decode(torch.tensor(v.encode(text))) == text


def test_word_round_trip_and_level():
    text = "it is a truth universally acknowledged , that a single man"
    v = Vocab(tokenize(text, "word"), level="word")
    assert v.level == "word"
    assert v.decode(v.encode(text)) == text
    assert v.encode("a truth") == [v["a"], v["truth"]]  # strings are tokenized at word level
    assert v.unknown_tokens("a wife") == ["wife"]


def test_decode_rejects_foreign_ids():
    with pytest.raises(GrulabError, match="outside"):
        Vocab("ab").decode([1, 7])


def test_vocab_save_load(tmp_path):
    v = Vocab(tokenize("春眠不觉晓，处处闻啼鸟。", "char"), level="char")
    d = v.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Vocab.from_dict(d) == v
    p = tmp_path / "vocab.json"
    v.save(p)
    assert "春" in p.read_text(encoding="utf-8")
    w = Vocab.load(p)
    assert w == v and w.level == "char" and w.encode("春眠") == v.encode("春眠")


def test_vocab_load_errors(tmp_path):
    with pytest.raises(GrulabError, match="not found") as info:
        Vocab.load(tmp_path / "missing.json")
    assert str(tmp_path / "missing.json") in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "grulab.vocab", ')
    with pytest.raises(GrulabError, match="invalid JSON") as info:
        Vocab.load(bad)
    assert str(bad) in str(info.value)
    bad.write_text(json.dumps({"format": "grulab.vocab", "version": 1, "level": "char", "tokens": ["a"]}))
    with pytest.raises(GrulabError, match="first token") as info:
        Vocab.load(bad)
    assert str(bad) in str(info.value)
    bad.write_text(json.dumps({"format": "grulab.vocab", "version": 1, "level": "char",
                               "tokens": [UNK, "a", "a"]}))
    with pytest.raises(GrulabError, match="twice"):
        Vocab.load(bad)


# ---------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(min_value=1, max_value=6),  # batch_size
    st.integers(min_value=1, max_value=9),  # num_steps
    st.integers(min_value=0, max_value=400),  # extra tokens beyond the minimum
    st.integers(min_value=0, max_value=2**31),  # seed
)


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_random_batches_are_shuffled_disjoint_windows(args):
    b, t, extra, seed = args
    n = min_tokens(b, t, "random") + extra
    ids = torch.arange(n)  # ids are positions, so a window shows where it came from
    batches = list(random_batches(ids, b, t, generator=gen(seed)))
    assert len(batches) == num_batches(n, b, t, "random") >= 1
    starts = []
    for X, Y in batches:
        assert X.shape == Y.shape == (b, t) and X.dtype == Y.dtype == torch.int64
        assert torch.equal(Y, X + 1)  # Y is X shifted by one
        assert torch.equal(X, X[:, :1] + torch.arange(t))  # each row is a contiguous window
        starts += X[:, 0].tolist()
    assert len(set(starts)) == len(starts)  # no window twice
    assert len({s % t for s in starts}) == 1  # one offset, windows on a grid: non-overlapping
    assert min(starts) >= 0 and max(starts) + t <= n - 1  # every target inside the corpus


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_sequential_batches_continue_row_by_row(args):
    b, t, extra, seed = args
    n = min_tokens(b, t, "sequential") + extra
    ids = torch.arange(n)
    batches = list(sequential_batches(ids, b, t, generator=gen(seed)))
    assert len(batches) == num_batches(n, b, t, "sequential") >= 1
    for X, Y in batches:
        assert X.shape == Y.shape == (b, t) and X.dtype == torch.int64
        assert torch.equal(Y, X + 1)
    rows = torch.cat([X for X, _ in batches], dim=1)  # (B, k*T)
    assert torch.equal(rows, rows[:, :1] + torch.arange(rows.shape[1]))  # batch k+1 continues batch k
    assert int(rows[0, 0]) <= t  # offset in [0, num_steps]
    assert int(rows[-1, -1]) + 1 <= n - 1  # every target inside the corpus
    assert (rows[1:, 0] > rows[:-1, -1]).all()  # rows are disjoint stretches, in corpus order


def test_random_sampling_visits_windows_in_random_order():
    ids = torch.arange(10_000)
    starts = torch.cat([X[:, 0] for X, _ in random_batches(ids, 8, 10, generator=gen(1))])
    assert not torch.equal(starts, starts.sort().values)


def test_batches_are_deterministic_with_a_seed():
    ids = torch.randint(0, 50, (3_000,), generator=gen(0))
    for sampler in (random_batches, sequential_batches):
        a = [torch.cat(xy) for xy in sampler(ids, 4, 7, generator=gen(42))]
        b = [torch.cat(xy) for xy in sampler(ids, 4, 7, generator=gen(42))]
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    offsets = {int(next(random_batches(torch.arange(3_000), 4, 7, generator=gen(s)))[0].min()) % 7
               for s in range(40)}
    assert len(offsets) > 1  # the offset really is random across seeds


def test_num_batches_matches_minimum():
    for sampling in ("random", "sequential"):
        need = min_tokens(32, 35, sampling)
        assert num_batches(need, 32, 35, sampling) == 1
        assert num_batches(need - 1, 32, 35, sampling) == 0
    with pytest.raises(GrulabError, match="sampling"):
        num_batches(100, 2, 2, "shuffled")
    with pytest.raises(GrulabError, match="--batch-size"):
        num_batches(100, 0, 2)


@pytest.mark.parametrize("sampler", [random_batches, sequential_batches])
def test_short_corpus_says_what_to_change(tmp_path, sampler):
    p = tmp_path / "short.txt"
    p.write_text("just a few characters")
    ds = build_dataset(str(p), val_fraction=0)
    with pytest.raises(GrulabError) as info:
        next(sampler(ds.train_ids, 32, 35, name=ds.name))
    msg = str(info.value)
    assert str(p) in msg and "21 tokens" in msg and "--batch-size" in msg and "--num-steps" in msg
    assert f"{min_tokens(32, 35, 'random' if sampler is random_batches else 'sequential'):,}" in msg


def test_split_train_val():
    ids = torch.arange(100)
    train, val = split_train_val(ids, 0.1)
    assert torch.equal(train, torch.arange(90)) and torch.equal(val, torch.arange(90, 100))
    train, val = split_train_val(ids, 0)
    assert len(train) == 100 and len(val) == 0
    for bad in (1.0, -0.1, 2):
        with pytest.raises(GrulabError, match="val-fraction"):
            split_train_val(ids, bad)


# ---------------------------------------------------------------------------
# build_dataset
# ---------------------------------------------------------------------------

def test_build_dataset_bundled():
    ds = build_dataset("tang300", val_fraction=0.1)
    assert ds.name == "tang300"
    assert len(ds.train_ids) + len(ds.val_ids) == 39_237
    assert len(ds.val_ids) == 3_923
    assert ds.train_ids.dtype == torch.int64
    assert len(ds.vocab) == 2_843  # 2,842 distinct chars + <unk>
    assert ds.vocab.decode(ds.train_ids[:7]) == "《感遇・其一》"


def test_build_dataset_d2l_and_word(tmp_path):
    p = tmp_path / "tm.txt"
    p.write_text("The Time Machine, by H. G. Wells\n\nThe Time Traveller!\n")
    ds = build_dataset(str(p), d2l=True, val_fraction=0)
    assert ds.vocab.decode(ds.train_ids) == "the time machine by h g wells the time traveller"
    ds = build_dataset(str(p), level="word", min_freq=2, val_fraction=0)
    assert ds.vocab.idx_to_token == [UNK, "The", "Time", "."]
    # Chinese text: the d2l MXNet notes' rule (newlines become spaces), not the letters-only one
    ds = build_dataset("tang300", d2l=True, val_fraction=0)
    assert ds.rule == "newlines" and ds.vocab.decode(ds.train_ids[:12]) == "《感遇・其一》 作者：张"
    assert build_dataset("austen", d2l=True).rule == "letters"


def test_the_notes_rule_fits_the_script():
    """The d2l PyTorch notes' letters-only rule for Latin text, the d2l MXNet notes' newline rule for any other."""
    assert notes_rule("The Time Machine, 1895\n") == "letters"
    assert notes_rule("Déjà vu, naïve café") == "letters"  # most letters A-Z
    assert notes_rule("床前明月光，疑是地上霜。\nChapter 1\n") == "newlines"
    assert notes_rule("Война и мир") == "newlines"  # letters-only would leave nothing
    assert notes_rule("1234 ...") == "newlines"  # no letters: keep everything
    assert notes_preprocess("分开\n不分开\r战争中部队") == ("分开 不分开 战争中部队", "newlines")
    assert d2l_zh_preprocess("a\nB\rc,") == "a B c,"  # nothing else changes, unlike the letters-only rule
    assert notes_preprocess("The Time,\nMachine!") == ("the time machine", "letters")
