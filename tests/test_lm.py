"""The language model from Python: LanguageModel, generate, train, evaluate, checkpoints.

Tiny models on tiny texts written to tmp_path; every run is seeded, nothing is
mocked except where a test needs to stop or break training at an exact point
(a Ctrl-C inside a batch, a weight turned into NaN).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import grulab.lm.train as train_mod
from grulab.lm import checkpoint
from grulab.lm.data import Vocab
from grulab.errors import GrulabError
from grulab.lm.generate import encode_prefix, generate, predict, sample_next
from grulab.lm.model import LanguageModel, ModelConfig
from grulab.lm.train import TrainConfig, evaluate, read_metrics, resume_config, train

# A text a tiny GRU learns within two epochs: period 9, vocabulary a-e.
PATTERN = "abcabdabe" * 40  # 360 chars -> 9 batches of 4x8 per epoch
DETERMINISTIC_KEYS = ("epoch", "step", "tokens", "train_ppl", "val_ppl", "lr")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: torch's thread pool only costs time here (a lot, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(cell="gru", vocab_size=7, hidden=16, layers=1, embed=0, dropout=0.0, seed=0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(vocab_size=vocab_size, cell=cell, hidden=hidden, layers=layers,
                                      embed=embed, dropout=dropout, **kw))
    return model.eval()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(run_dir) -> dict:
    return checkpoint.load(run_dir).model.state_dict()


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("embed", [0, 5], ids=["one-hot", "embedding"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_forward_shapes(cell, embed):
    B, T, V, H, L = 3, 5, 7, 8, 2
    model = tiny_model(cell, vocab_size=V, hidden=H, layers=L, embed=embed)
    idx = torch.randint(V, (B, T), generator=gen(0))
    logits, state = model(idx)
    assert logits.shape == (B, T, V)
    if cell == "lstm":
        assert isinstance(state, tuple) and [s.shape for s in state] == [(L, B, H), (L, B, H)]
    else:
        assert state.shape == (L, B, H)
    init = model.init_state(B)
    assert (init[0] if cell == "lstm" else init).shape == (L, B, H)
    # the head sees the recurrent output: one-hot input means the first linear layer is V wide
    assert (model.embedding is None) == (embed == 0)


@pytest.mark.parametrize("embed", [0, 4], ids=["one-hot", "embedding"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_state_carried_two_halves_equal_one_pass(cell, embed):
    model = tiny_model(cell, vocab_size=9, hidden=12, layers=2, embed=embed)
    idx = torch.randint(9, (4, 10), generator=gen(1))
    with torch.no_grad():
        full, state_full = model(idx)
        first, s = model(idx[:, :6])
        second, state_two = model(idx[:, 6:], s)
    assert_close(torch.cat([first, second], dim=1), full)
    if cell == "lstm":
        assert_close(state_two[0], state_full[0])
        assert_close(state_two[1], state_full[1])
    else:
        assert_close(state_two, state_full)


@pytest.mark.parametrize(
    "kw",
    [dict(cell="gru"), dict(cell="gru", layers=3), dict(cell="gru", layers=2, embed=5),
     dict(cell="gru", layers=2, reset_after=False), dict(cell="lstm"), dict(cell="lstm", layers=2),
     dict(cell="rnn", layers=2), dict(cell="mingru", layers=2), dict(cell="mingru-block", layers=2, embed=5)],
    ids=["gru", "gru-3-layers", "gru-2-layers-embed", "gru-reset-before", "lstm", "lstm-2-layers", "rnn-2-layers",
         "mingru-2-layers", "mingru-block-2-layers"],
)
def test_step_equals_forward(kw):
    V = 8
    model = tiny_model(vocab_size=V, hidden=16, dropout=0.3, **kw)  # eval mode: dropout off
    idx = torch.randint(V, (3, 9), generator=gen(2))
    with torch.no_grad():
        full, final = model(idx)
    state = None
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        assert logits.shape == (3, V)
        assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)  # the last position of forward over 0..t
    if isinstance(final, tuple):
        for a, b in zip(state, final):
            assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        assert_close(state, final, rtol=1e-5, atol=1e-5)


def test_model_config_rejects_bad_values():
    for bad in [dict(cell="foo"), dict(hidden=0), dict(hidden=-3), dict(layers=0), dict(embed=-1),
                dict(dropout=1.0), dict(dropout=-0.1), dict(vocab_size=0)]:
        with pytest.raises(ValueError):
            ModelConfig(**{"vocab_size": 5, **bad})


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

TEXT = "hello world, hold the door"


@pytest.fixture
def lm():
    vocab = Vocab(TEXT)
    return tiny_model("gru", vocab_size=len(vocab), hidden=24, layers=2, seed=3), vocab


def naive_greedy(model, ids: list[int], length: int) -> list[int]:
    """Re-run the whole sequence each step and take the argmax: slow, obviously right."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(length):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("cell", ["gru", "lstm", "mingru", "mingru-block"])
def test_greedy_generate_equals_rerunning_the_sequence(cell):
    vocab = Vocab(TEXT)
    model = tiny_model(cell, vocab_size=len(vocab), hidden=24, layers=2, seed=4)
    prefix, n = "hel", 12
    pieces = list(generate(model, vocab, prefix, n))
    assert len(pieces) == n
    expected = naive_greedy(model, vocab.encode(prefix), n)
    assert "".join(pieces) == vocab.decode(expected[len(prefix):])
    assert predict(model, vocab, prefix, n) == prefix + "".join(pieces)


def test_generate_reads_the_prefix_once(lm, monkeypatch):
    model, vocab = lm
    calls = []
    real_forward = model.forward

    def counting(idx, state=None):
        calls.append(tuple(idx.shape))
        return real_forward(idx, state)

    monkeypatch.setattr(model, "forward", counting)
    out = list(generate(model, vocab, "hold", 15, temperature=0.9, generator=gen(0)))
    assert len(out) == 15
    assert calls == [(1, 4)]  # one pass over the prefix; each new token is one model.step


def test_generate_is_a_stream(lm):
    model, vocab = lm
    it = generate(model, vocab, "he", 1000)
    first = next(it)
    assert isinstance(first, str) and len(first) == 1
    it.close()


def test_top_k_1_equals_greedy(lm):
    model, vocab = lm
    greedy = "".join(generate(model, vocab, "wor", 20))
    assert "".join(generate(model, vocab, "wor", 20, temperature=1.3, top_k=1, generator=gen(5))) == greedy


def test_top_k_samples_only_the_k_most_likely():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.0, 1.9, -0.5, 1.0]])  # ranks: 1, 5, 3, 7, 0, 4, 6, 2
    n = 4000
    for k, allowed in [(1, {1}), (2, {1, 5}), (3, {1, 5, 3}), (5, {1, 5, 3, 7, 0})]:
        picks = sample_next(logits.expand(n, -1), temperature=2.0, top_k=k, generator=gen(k))
        assert picks.shape == (n,)
        assert set(picks.tolist()) == allowed  # never outside the top k, and every one of them turns up
    # top_k >= V is plain sampling
    picks = sample_next(logits.expand(n, -1), temperature=3.0, top_k=8, generator=gen(9))
    assert set(picks.tolist()) == set(range(8))


@pytest.mark.parametrize("top_p, kept", [(0.3, {2}), (0.6, {2, 0}), (0.74, {2, 0}), (0.76, {2, 0, 4}),
                                         (0.9, {2, 0, 4, 1}), (1.0, {2, 0, 4, 1, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.25, 0.0625, 0.5, 0.0625, 0.125])  # sorted: 2 (.5), 0 (.25), 4 (.125), 1, 3
    logits = probs.log()[None]
    n = 6000
    picks = sample_next(logits.expand(n, -1), temperature=1.0, top_p=top_p, generator=gen(7))
    assert set(picks.tolist()) == kept
    # the kept tokens keep their relative odds (renormalised)
    freq = torch.bincount(picks, minlength=5).double() / n
    mass = sum(float(probs[i]) for i in kept)
    for i in kept:
        assert freq[i].item() == pytest.approx(float(probs[i]) / mass, abs=0.03)


def test_temperature_zero_is_argmax_and_sampling_is_seeded():
    logits = torch.randn(5, 11, generator=gen(0))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    a = sample_next(logits, temperature=1.0, generator=gen(3))
    b = sample_next(logits, temperature=1.0, generator=gen(3))
    assert torch.equal(a, b)


def test_tiny_temperature_is_greedy():
    logits = torch.randn(6, 9, generator=gen(4))
    assert torch.equal(sample_next(logits, temperature=1e-40, generator=gen(0)), logits.argmax(-1))


def test_word_level_generation():
    vocab = Vocab("the cat sat on the mat .", level="word")
    model = tiny_model("gru", vocab_size=len(vocab), hidden=16, seed=6)
    pieces = list(generate(model, vocab, "the cat", 6))
    assert len(pieces) == 6 and all(p.startswith(" ") and p[1:] in vocab for p in pieces)
    expected = naive_greedy(model, vocab.encode("the cat"), 6)[2:]
    assert "".join(pieces) == " " + vocab.decode(expected)
    assert predict(model, vocab, "the cat", 6) == "the cat" + "".join(pieces)


def test_seeded_generation_is_reproducible(lm):
    model, vocab = lm
    kw = dict(temperature=1.5, top_p=0.95)
    a = list(generate(model, vocab, "the ", 40, generator=gen(11), **kw))
    b = list(generate(model, vocab, "the ", 40, generator=gen(11), **kw))
    c = list(generate(model, vocab, "the ", 40, generator=gen(12), **kw))
    assert a == b and len(a) == 40
    assert a != c  # a different seed gives another sample (40 draws at temperature 1.5)


def test_unknown_prefix_tokens_become_unk_with_a_warning(lm):
    model, vocab = lm
    with pytest.warns(UserWarning, match="never saw.*'z'"):
        ids = encode_prefix(vocab, "zhe")
    assert ids[0] == vocab.unk == 0 and ids[1:] == vocab.encode("he")
    with pytest.warns(UserWarning, match="never saw"):
        out = "".join(generate(model, vocab, "zhe", 8))
    assert out == vocab.decode(naive_greedy(model, [0] + vocab.encode("he"), 8)[3:])


def test_generate_rejects_bad_arguments(lm):
    model, vocab = lm
    for kw in [dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=1.0, top_k=0),
               dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5)]:
        with pytest.raises(GrulabError):
            list(generate(model, vocab, "he", 3, **kw))
    with pytest.raises(GrulabError, match="empty"):
        list(generate(model, vocab, "", 3))


def test_generate_restores_training_mode(lm):
    model, vocab = lm
    model.train()
    list(generate(model, vocab, "he", 3))
    assert model.training


# ---------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, num_steps", [(1, 4), (2, 4), (3, 5), (32, 64)])
def test_evaluate_equals_hand_computation(batch_size, num_steps):
    V = 6
    model = tiny_model("gru", vocab_size=V, hidden=12, dropout=0.5)
    model.train()  # evaluate must switch dropout off, and switch the mode back after
    ids = torch.randint(V, (24,), generator=gen(8))
    nll, n = evaluate(model, ids, batch_size=batch_size, num_steps=num_steps)
    assert model.training

    model.eval()
    rows = max(1, min(batch_size, 23 // num_steps))
    length = 23 // rows
    xs = ids[: rows * length].view(rows, length)
    ys = ids[1: rows * length + 1].view(rows, length)
    with torch.no_grad():
        logits, _ = model(xs)  # each row in one pass: the chunked, state-carrying evaluation must agree
    ce = F.log_softmax(logits, -1).gather(-1, ys[..., None]).neg().mean().item()
    assert n == rows * length
    assert nll == pytest.approx(ce, rel=1e-5)
    assert math.exp(nll) == pytest.approx(math.exp(ce), rel=1e-5)


def test_evaluate_one_token_is_nan():
    nll, n = evaluate(tiny_model(vocab_size=4), torch.tensor([1]))
    assert n == 0 and math.isnan(nll)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(cell="gru"), dict(cell="lstm", layers=2, embed=6), dict(cell="rnn", dropout=0.2),
                                dict(cell="mingru", layers=2), dict(cell="mingru-block", layers=2, embed=6)],
                         ids=["gru", "lstm", "rnn", "mingru", "mingru-block"])
def test_checkpoint_round_trip(tmp_path, kw):
    vocab = Vocab(TEXT)
    model = tiny_model(vocab_size=len(vocab), hidden=10, **kw)
    where = checkpoint.save(tmp_path / "run", model, vocab, {"corpus": "x"}, {"epoch": 3})
    assert where == tmp_path / "run" / "checkpoint"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint"]  # no checkpoint.tmp / .old left behind
    assert {"model.safetensors", "config.json", "vocab.json"} <= set(os.listdir(where))
    for path in (tmp_path / "run", where):  # the run directory or the checkpoint directory
        ck = checkpoint.load(path)
        assert not ck.model.training
        assert ck.vocab == vocab and ck.train == {"corpus": "x"} and ck.progress == {"epoch": 3}
        assert ck.model.config == model.config
        idx = torch.randint(len(vocab), (2, 7), generator=gen(0))
        with torch.no_grad():
            assert torch.equal(ck.model(idx)[0], model(idx)[0])


def test_checkpoint_save_is_atomic_and_overwrites(tmp_path):
    vocab = Vocab(TEXT)
    run = tmp_path / "run"
    (run / "checkpoint.tmp").mkdir(parents=True)  # the leftovers of a save that was killed
    (run / "checkpoint.tmp" / "model.safetensors").write_bytes(b"garbage")
    checkpoint.save(run, tiny_model(vocab_size=len(vocab), seed=1), vocab, {}, {"epoch": 1})
    second = tiny_model(vocab_size=len(vocab), seed=2)
    checkpoint.save(run, second, vocab, {}, {"epoch": 2})
    assert sorted(os.listdir(run)) == ["checkpoint"]
    ck = checkpoint.load(run)
    assert ck.progress == {"epoch": 2} and same_weights(ck.model.state_dict(), second.state_dict())
    # killed between the two renames: only checkpoint.old is there, and it still loads
    os.replace(run / "checkpoint", run / "checkpoint.old")
    assert checkpoint.load(run).progress == {"epoch": 2}


@pytest.fixture
def saved(tmp_path):
    vocab = Vocab(TEXT)
    checkpoint.save(tmp_path / "run", tiny_model(vocab_size=len(vocab)), vocab, {}, {})
    return tmp_path / "run", tmp_path / "run" / "checkpoint"


def test_checkpoint_vocab_mismatch(saved):
    run, ck = saved
    d = json.loads((ck / "vocab.json").read_text(encoding="utf-8"))
    d["tokens"] = d["tokens"][:-1]  # drop a token
    (ck / "vocab.json").write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(GrulabError, match="does not match its vocabulary"):
        checkpoint.load(run)


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_checkpoint_truncated_weights(saved, keep):
    run, ck = saved
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(GrulabError, match="model.safetensors"):
        checkpoint.load(run)


@pytest.mark.parametrize("damage", ["missing-weights", "config-not-json", "config-not-grulab", "config-bad-model",
                                    "vocab-not-json", "vocab-missing", "weights-wrong-shape"])
def test_checkpoint_damaged(saved, damage):
    run, ck = saved
    config = json.loads((ck / "config.json").read_text())
    if damage == "missing-weights":
        (ck / "model.safetensors").unlink()
    elif damage == "config-not-json":
        (ck / "config.json").write_text("{not json")
    elif damage == "config-not-grulab":
        (ck / "config.json").write_text(json.dumps({"format": "something-else"}))
    elif damage == "config-bad-model":
        config["model"]["hidden"] = -1
        (ck / "config.json").write_text(json.dumps(config))
    elif damage == "vocab-not-json":
        (ck / "vocab.json").write_bytes(b"\xff\xfe\x00")
    elif damage == "vocab-missing":
        (ck / "vocab.json").unlink()
    else:  # the config says 20 hidden units, the weights have 16
        config["model"]["hidden"] = 20
        (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(GrulabError):
        checkpoint.load(run)


def test_checkpoint_missing(tmp_path):
    with pytest.raises(GrulabError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrulabError, match="no checkpoint"):
        checkpoint.load(tmp_path / "empty")


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "pattern.txt"
    path.write_text(PATTERN, encoding="utf-8")
    return path


def tiny_train(corpus, out, **kw) -> TrainConfig:
    """Adam, cosine schedule, dropout (so resume must restore the RNG too), epoch budget only."""
    d = dict(corpus=str(corpus), hidden=24, embed=0, batch_size=4, num_steps=8, epochs=2, max_minutes=0.0,
             lr=1e-2, dropout=0.1, seed=3, out=str(out), prefixes=["ab"], predict_length=4, progress=False)
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """Two epochs straight through: the run the others are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    last = train(tiny_train(corpus, out))
    assert last["epoch"] == 2
    return out


def test_training_writes_checkpoint_metrics_and_plot(straight):
    ck = straight / "checkpoint"
    assert {"model.safetensors", "optimizer.safetensors", "state.safetensors", "config.json",
            "vocab.json"} <= set(os.listdir(ck))
    assert not (straight / "checkpoint.tmp").exists() and not (straight / "checkpoint.old").exists()
    rows = read_metrics(straight / "metrics.jsonl")
    assert len(rows) == 2  # one line per epoch
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"epoch", "train_ppl", "val_ppl", "tokens_per_s"} <= r.keys()
        assert r["tokens_per_s"] > 0 and math.isfinite(r["train_ppl"]) and math.isfinite(r["val_ppl"])
    assert rows[1]["step"] == 2 * rows[0]["step"] == 18  # 9 batches of 4x8 per epoch
    assert (straight / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = checkpoint.load(straight)
    assert loaded.progress["epoch"] == 2 and loaded.vocab == Vocab(PATTERN)
    assert loaded.train["hidden"] == 24


def test_training_learns_a_pattern(straight):
    rows = read_metrics(straight / "metrics.jsonl")
    assert rows[1]["val_ppl"] < rows[0]["val_ppl"]
    assert rows[1]["train_ppl"] < rows[0]["train_ppl"]
    assert rows[1]["val_ppl"] < 5  # below chance over a-e plus <unk> (6)


def test_seeded_training_is_deterministic(corpus, straight, tmp_path):
    train(tiny_train(corpus, tmp_path / "again"))
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(tmp_path / "again" / "metrics.jsonl")
    assert [{k: r[k] for k in DETERMINISTIC_KEYS} for r in a] == [{k: r[k] for k in DETERMINISTIC_KEYS} for r in b]
    assert same_weights(weights(straight), weights(tmp_path / "again"))


def _fake_clock(tick: float) -> SimpleNamespace:
    now = [1000.0]

    def perf_counter() -> float:
        now[0] += tick
        return now[0]

    return SimpleNamespace(perf_counter=perf_counter)


def test_seeded_training_does_not_depend_on_the_clock(corpus, tmp_path, monkeypatch):
    """Both runs finish their 2 epochs long before the 60-minute budget; only the clock speed differs."""
    results = []
    for tick, name in [(1e-4, "fast"), (0.5, "slow")]:
        monkeypatch.setattr(train_mod, "time", _fake_clock(tick))
        last = train(tiny_train(corpus, tmp_path / name, max_minutes=60.0, epochs=2))
        assert last["epoch"] == 2
        results.append(weights(tmp_path / name))
    assert same_weights(*results)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_resume_after_an_epoch_equals_training_straight(corpus, tmp_path, sampling):
    # constant LR: the cosine schedule is laid out over the budget, which --epochs 2 extends
    cfg = dict(schedule="constant", sampling=sampling)
    train(tiny_train(corpus, tmp_path / "straight", **cfg))
    train(tiny_train(corpus, tmp_path / "resumed", epochs=1, **cfg))
    assert checkpoint.load(tmp_path / "resumed").progress["epoch"] == 1
    train(resume_config(tmp_path / "resumed", epochs=2, max_minutes=0, progress=False))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for k in a:
        assert_close(b[k], a[k], rtol=0, atol=0)
    ma, mb = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [{k: r[k] for k in DETERMINISTIC_KEYS} for r in ma] == [{k: r[k] for k in DETERMINISTIC_KEYS} for r in mb]


def _interrupt_training(monkeypatch, at: int, where: str):
    """Press Ctrl-C (a real SIGINT to this process) during the ``at``-th training batch (1-based,
    counted over the run), either as its forward pass starts or in the middle of its
    backward/update (in clip_grad_norm_). Training finishes that batch, saves and stops."""
    count = [0]
    real_forward = LanguageModel.forward
    real_clip = torch.nn.utils.clip_grad_norm_

    def forward(self, idx, state=None):
        if self.training:
            count[0] += 1
            if where == "forward" and count[0] == at:
                signal.raise_signal(signal.SIGINT)
        return real_forward(self, idx, state)

    def clip(*args, **kw):
        if where == "clip" and count[0] == at:
            signal.raise_signal(signal.SIGINT)
        return real_clip(*args, **kw)

    monkeypatch.setattr(LanguageModel, "forward", forward)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


@pytest.mark.parametrize("sampling, at, cell", [("sequential", 13, "gru"), ("random", 13, "gru"),
                                               ("sequential", 10, "gru"), ("sequential", 6, "lstm"),
                                               ("sequential", 13, "mingru-block")],
                         ids=["sequential-mid-epoch", "random-mid-epoch", "sequential-epoch-start",
                              "lstm-sequential-epoch-1", "mingru-block-sequential-mid-epoch"])
def test_ctrl_c_then_resume_equals_training_straight(corpus, straight, tmp_path, monkeypatch, sampling, at, cell):
    """Ctrl-C as batch ``at`` starts (counted over the run: 9 batches an epoch), then --resume: the
    same weights as training straight through, with the cosine schedule, Adam, dropout and the
    carried state ((h, c) for the LSTM, (h, conv window) for the minGRU block)."""
    if (sampling, cell) == ("sequential", "gru"):
        reference = straight
    else:
        reference = tmp_path / "straight"
        train(tiny_train(corpus, reference, sampling=sampling, cell=cell))
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_training(m, at, "forward")
        with pytest.raises(KeyboardInterrupt):
            train(tiny_train(corpus, out, sampling=sampling, cell=cell))
    progress = checkpoint.load(out).progress  # the batch Ctrl-C came in is finished, then saved
    assert (progress["epoch"], progress["batch"], progress["step"]) == (at // 9, at % 9, at)
    train(resume_config(out, epochs=2, max_minutes=0, progress=False))
    a, b = weights(reference), weights(out)
    for k in a:
        assert_close(b[k], a[k], rtol=0, atol=0)


def test_ctrl_c_during_the_update_then_resume_equals_training_straight(corpus, straight, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_training(m, 13, "clip")
        with pytest.raises(KeyboardInterrupt):
            train(tiny_train(corpus, out))
    progress = checkpoint.load(out).progress
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 4, 13)
    train(resume_config(out, epochs=2, max_minutes=0, progress=False))
    a, b = weights(straight), weights(out)
    for k in a:
        assert_close(b[k], a[k], rtol=0, atol=0)


def test_ctrl_c_during_evaluation_still_saves(corpus, tmp_path, monkeypatch):
    real_evaluate = train_mod.evaluate

    def interrupted(*args, **kw):
        signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_train(corpus, tmp_path / "run", epochs=2))
    progress = checkpoint.load(tmp_path / "run").progress  # epoch 1 evaluated, saved, then stopped
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 0, 9)


@pytest.mark.parametrize("given", [0, 2])
def test_training_lets_torchs_count_follow_the_thread_governor_unless_threads_is_given(corpus, tmp_path, given):
    """grulab train owns its process: torch's ops around the GRU follow the governor's count
    (grulab.kernels.threads.steer_torch) while it trains, unless --threads fixed the count; afterwards
    steering is off again."""
    from grulab.kernels import threads

    before = torch.get_num_threads()
    seen = []
    try:
        train(tiny_train(corpus, tmp_path / "run", epochs=1, threads=given),
              on_epoch=lambda row: seen.append(threads._steer))
    finally:
        torch.set_num_threads(before)
    assert seen == [not given] and threads._steer is False


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    """After epoch 1 the model starts producing NaN: training stops with a clear error in epoch 2,
    and the epoch-1 checkpoint is intact."""
    poisoned = [False]
    real_forward = LanguageModel.forward

    def forward(self, idx, state=None):
        logits, state = real_forward(self, idx, state)
        if poisoned[0] and self.training:
            logits = logits * float("nan")
        return logits, state

    monkeypatch.setattr(LanguageModel, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(GrulabError, match="diverged at epoch 2") as e:
        train(tiny_train(corpus, out, epochs=3), on_epoch=lambda row: poisoned.__setitem__(0, True))
    assert "checkpoint" in str(e.value) and "\n" not in str(e.value)
    ck = checkpoint.load(out, with_training_state=True)
    assert ck.progress["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in ck.model.state_dict().values())
    assert len(read_metrics(out / "metrics.jsonl")) == 1


def test_nan_loss_in_the_first_epoch(corpus, tmp_path, monkeypatch):
    real_forward = LanguageModel.forward

    def forward(self, idx, state=None):
        logits, state = real_forward(self, idx, state)
        return logits * float("nan"), state

    monkeypatch.setattr(LanguageModel, "forward", forward)
    with pytest.raises(GrulabError, match="diverged at epoch 1, batch 1.*no checkpoint"):
        train(tiny_train(corpus, tmp_path / "run"))


def test_exploding_sgd_stops_with_diverged(corpus, tmp_path):
    with pytest.raises(GrulabError, match="diverged"):
        train(tiny_train(corpus, tmp_path / "run", optimizer="sgd", lr=1e30, clip=0.0, schedule="constant",
                         dropout=0.0))


def test_training_rejects_bad_input(corpus, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcabc")
    with pytest.raises(GrulabError, match="too short"):
        train(tiny_train(short, tmp_path / "a"))
    with pytest.raises(GrulabError):  # nothing to resume
        resume_config(tmp_path / "nothing")
    with pytest.raises(GrulabError, match="--hidden cannot change on --resume"):
        resume_config(tmp_path / "nothing", hidden=3)
    for bad in [dict(hidden=0), dict(hidden=-3), dict(lr=0.0), dict(lr=float("nan")), dict(dropout=1.5),
                dict(cell="foo"), dict(batch_size=0), dict(clip=-1.0), dict(epochs=-1),
                dict(epochs=0, max_minutes=0.0)]:
        with pytest.raises(GrulabError):
            tiny_train(corpus, tmp_path / "b", **bad)


def test_resume_with_another_corpus_is_refused(corpus, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    other = tmp_path / "other.txt"
    other.write_text("xyz" * 200)
    config["train"]["corpus"] = str(other)
    (run / "checkpoint" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GrulabError, match="vocabulary"):
        train(resume_config(run, epochs=3, progress=False))
