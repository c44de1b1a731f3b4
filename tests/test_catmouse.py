"""grulab.views.catmouse: the GRU keeps the mouse in mind, the tanh RNN forgets it.

The fast check trains at two distances with a small budget (a few seconds on
one CPU thread). Seeds are fixed and the margins wide: over seeds 0-5 the GRU
scores 100% at distance 80 and the RNN 24-31% (chance 25%).
"""
from __future__ import annotations

import torch

from grulab.views import catmouse


def test_make_task_shapes_and_labels():
    g = torch.Generator().manual_seed(0)
    x, y, key_pos = catmouse.make_task(500, 20, g, keys=3)
    assert x.shape == (500, 20 + catmouse.EARLY) and y.shape == key_pos.shape == (500,)
    assert set(y.tolist()) == {0, 1, 2, 3}
    for xi, yi, p in zip(x, y, key_pos):
        keys = torch.nonzero(xi != catmouse.FILLER).flatten().tolist()
        if yi == 0:
            assert keys == [] and p == -1  # nothing but cats
        else:
            assert keys == [int(p)] and xi[p] == yi  # exactly one key, and the label names it
            assert 0 <= p < catmouse.EARLY  # early: at least `distance` steps before the end
    # The training curriculum puts the key anywhere before the last step.
    _, _, pos = catmouse.make_task(2000, 20, g, vary=True)
    assert pos.max() > catmouse.EARLY and pos.max() < 20 + catmouse.EARLY - 1


def test_gru_remembers_rnn_forgets(tmp_path):
    torch_threads = torch.get_num_threads()
    result = catmouse.run(distances=(5, 80), steps=200, seed=0, out_dir=tmp_path, test_size=500, quiet=True,
                           trace_distance=80)
    assert torch.get_num_threads() == torch_threads  # restored

    gru, rnn = result["accuracy"]["gru"], result["accuracy"]["rnn"]
    assert result["chance"] == 0.25
    assert gru[0] > 0.95 and rnn[0] > 0.95  # a short gap: both manage
    assert gru[1] > 0.95  # a long gap: the GRU still remembers ...
    assert rnn[1] < 0.5 and gru[1] - rnn[1] > 0.4  # ... the RNN is near chance

    gate = result["gate"]
    assert gate["distance"] == 80
    assert gate["z_key"] < gate["z_filler"] - 0.1  # rewrite at the mouse, keep through the cats
    example = gate["example"]
    z = example["z"]
    k = example["key_pos"]
    assert example["tokens"][k] != "cat" and len(z) == 80 + catmouse.EARLY
    assert z[k] < sum(z[k + 1 :]) / len(z[k + 1 :])

    png = tmp_path / "catmouse.png"
    assert result["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_gates_match_the_layer():
    """z from update_gates is the update gate of the layer's own forward: with the states h_{t-1} the
    layer itself computes (impl "auto", the fused kernel), Z_t = σ(X_t W_xz + b_iz + H_{t-1} W_hz + b_hz),
    and the new state h_t = z ⊙ h_{t-1} + (1 − z) ⊙ ñ holds with that z."""
    torch.manual_seed(0)
    model = catmouse.Classifier("gru", 6, 3)
    x, _, _ = catmouse.make_task(4, 10, torch.Generator().manual_seed(1))
    z = catmouse.update_gates(model.rnn, x)  # (B, T, H)
    assert z.shape == (4, 10 + catmouse.EARLY, 6)

    gru = model.rnn
    inputs = torch.nn.functional.one_hot(x.t(), gru.input_size).float()  # (T, B, V)
    with torch.no_grad():
        out, _ = gru(inputs)  # (T, B, H): the layer's own states
        h_prev = torch.cat([torch.zeros_like(out[:1]), out[:-1]])  # (T, B, H): h_{t-1}
        W_iz, W_hz = gru.weight_ih_l0.chunk(3)[1], gru.weight_hh_l0.chunk(3)[1]
        b_iz, b_hz = gru.bias_ih_l0.chunk(3)[1], gru.bias_hh_l0.chunk(3)[1]
        z_layer = torch.sigmoid(inputs @ W_iz.T + b_iz + h_prev @ W_hz.T + b_hz)  # (T, B, H)
    torch.testing.assert_close(z, z_layer.transpose(0, 1), rtol=1e-4, atol=1e-5)
    assert z.std() > 0.01  # not a constant: the gates vary with the input and the state
