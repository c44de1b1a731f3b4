# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gated recurrent units (GRU), with grulab
#
# The GRU chapter of the d2l notes, cell by cell: the equations next to the code that computes
# them, the notes' from-scratch GRU checked against `grulab.GRU`, the concise version, training
# with the notes' two setups, prediction from their prefixes, what the gates do, the cat/mouse
# motivation, and the notes' two exercises.
#
# Two versions of the notes are followed here:
#
# * **the d2l PyTorch notes**: the scratch GRU on H. G. Wells' *The Time Machine*, batches of
#   32 × 35, SGD with learning rate 1, gradient clipping at 1, 500 epochs: `grulab train --preset d2l`;
# * **the d2l MXNet notes**: the scratch GRU on Chinese song lyrics, the same batch shape, SGD with
#   learning rate 0.2, clipping at 5, 200 epochs: `grulab train --preset d2l-zh`.
#
# The whole notebook runs in about two minutes on a laptop CPU: every training run gets a budget of
# seconds instead of the notes' hundreds of epochs. Raise `MINUTES` below to see the models learn.

# %%
import inspect
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from IPython.display import Image, display

import grulab
from grulab.views import catmouse
from grulab.lm import checkpoint, compare, plots
from grulab import reference
from grulab.cli import main as grulab_cli
from grulab.lm.generate import predict
from grulab.lm.train import TrainConfig, read_metrics, with_preset

# The test suite runs this notebook with GRULAB_NOTEBOOK_QUICK=1: the same cells on tiny budgets,
# with a smaller model and validation text (SMALL); a reader's run keeps the notes' sizes.
QUICK = os.environ.get("GRULAB_NOTEBOOK_QUICK") == "1"
MINUTES = 0.05 if QUICK else 0.4  # training budget of each preset run (the notes: hundreds of epochs)
SMALL = dict(hidden=32, val_fraction=0.02) if QUICK else {}
SMALL_FLAGS = [w for k, v in SMALL.items() for w in ("--" + k.replace("_", "-"), str(v))]
WORK = Path(os.environ.get("GRULAB_NOTEBOOK_OUT", "runs/notebook-en"))
WORK.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
print("grulab", grulab.__version__, "· torch", torch.__version__, "· runs in", WORK)


# %% [markdown]
# ## 1. The equations and the code that computes them
#
# For a minibatch $\mathbf{X}_t \in \mathbb{R}^{n \times d}$ and the previous hidden state
# $\mathbf{H}_{t-1} \in \mathbb{R}^{n \times h}$:
#
# $$\mathbf{R}_t = \sigma(\mathbf{X}_t \mathbf{W}_{xr} + \mathbf{H}_{t-1} \mathbf{W}_{hr} + \mathbf{b}_r)
# \qquad \text{reset gate}$$
#
# $$\mathbf{Z}_t = \sigma(\mathbf{X}_t \mathbf{W}_{xz} + \mathbf{H}_{t-1} \mathbf{W}_{hz} + \mathbf{b}_z)
# \qquad \text{update gate}$$
#
# $$\tilde{\mathbf{H}}_t = \tanh(\mathbf{X}_t \mathbf{W}_{xh} + (\mathbf{R}_t \odot \mathbf{H}_{t-1})
# \mathbf{W}_{hh} + \mathbf{b}_h) \qquad \text{candidate hidden state}$$
#
# $$\mathbf{H}_t = \mathbf{Z}_t \odot \mathbf{H}_{t-1} + (1 - \mathbf{Z}_t) \odot \tilde{\mathbf{H}}_t
# \qquad \text{hidden state}$$
#
# `grulab.reference.gru_step` is these four lines, one line of code per equation, with the weights
# stored as `torch.nn.GRU` stores them (`w_ih` stacks $\mathbf{W}_{xr}^\top, \mathbf{W}_{xz}^\top,
# \mathbf{W}_{xh}^\top$ in the gate order r | z | n). `reset_after=False` is the candidate above (the
# PyTorch notes); `reset_after=True` applies the reset gate after the product,
# $\mathbf{R}_t \odot (\mathbf{H}_{t-1}\mathbf{W}_{hh})$, as PyTorch, cuDNN and the MXNet notes do.

# %%
print(inspect.getsource(reference.gru_step))

# %% [markdown]
# When R is close to 1 the candidate is a plain RNN step; when R is close to 0 it forgets the old
# state and is an MLP of the input. When Z is close to 1 the state is carried over unchanged (the
# step is skipped); when Z is close to 0 the state becomes the candidate.

# %% [markdown]
# ## 2. The notes' GRU from scratch, checked against `grulab.GRU`
#
# The PyTorch notes' `get_params` and `gru`, as they write them (one bias per gate, weights from
# N(0, 0.01²)); then the same parameters in a `grulab.GRU` with `reset_after=False`.

# %%
vocab_size, num_hiddens = 28, 32


def get_params(vocab_size, num_hiddens):
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape) * 0.01

    def three():
        return (normal((num_inputs, num_hiddens)), normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens))

    W_xz, W_hz, b_z = three()  # update gate
    W_xr, W_hr, b_r = three()  # reset gate
    W_xh, W_hh, b_h = three()  # candidate hidden state
    W_hq, b_q = normal((num_hiddens, num_outputs)), torch.zeros(num_outputs)
    return [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]


def gru(inputs, state, params):  # the PyTorch notes: (R ⊙ H) W_hh
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    H, = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H) @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        outputs.append(H)  # the hidden states; the notes add the output layer here
    return torch.stack(outputs), (H,)


def gru_mxnet(inputs, H, *params):  # the MXNet notes' gru_rnn: R multiplies H W_hh after the product
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = params[:9]
    outputs = []
    for X in inputs:
        Z = torch.sigmoid(X @ W_xz + H @ W_hz + b_z)
        R = torch.sigmoid(X @ W_xr + H @ W_hr + b_r)
        H_tilda = torch.tanh(X @ W_xh + R * (H @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        outputs.append(H)
    return torch.stack(outputs), H


def as_grulab(params, reset_after):
    """The notes' parameters in a grulab.GRU: rows in the gate order r | z | n, the second bias zero."""
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = params[:9]
    layer = grulab.GRU(vocab_size, num_hiddens, reset_after=reset_after)
    with torch.no_grad():
        layer.weight_ih_l0.copy_(torch.cat([W_xr.T, W_xz.T, W_xh.T]))
        layer.weight_hh_l0.copy_(torch.cat([W_hr.T, W_hz.T, W_hh.T]))
        layer.bias_ih_l0.copy_(torch.cat([b_r, b_z, b_h]))
        layer.bias_hh_l0.zero_()
    return layer


params = get_params(vocab_size, num_hiddens)
for p in params[2:9:3]:
    p.normal_(0, 0.1)  # nonzero biases, so that the check covers them too
inputs = F.one_hot(torch.randint(vocab_size, (35, 4)), vocab_size).float()  # (T, B, V): 35 steps, batch 4
H0 = torch.zeros(4, num_hiddens)
with torch.no_grad():
    ours, _ = as_grulab(params, reset_after=False)(inputs, H0[None])
    notes, _ = gru(inputs, (H0,), params)
    ours_mx, _ = as_grulab(params, reset_after=True)(inputs, H0[None])
    notes_mx, _ = gru_mxnet(inputs, H0, *params)
print("PyTorch notes vs grulab.GRU(reset_after=False): max |difference| =", (ours - notes).abs().max().item())
print("MXNet notes   vs grulab.GRU(reset_after=True), b_hn = 0:        ", (ours_mx - notes_mx).abs().max().item())
assert torch.allclose(ours, notes, atol=1e-6) and torch.allclose(ours_mx, notes_mx, atol=1e-6)

# %% [markdown]
# `grulab train --init d2l` initialises a model as `get_params` does, and holds the second bias that
# PyTorch's layout has at zero, so that each gate has one bias, as in the notes.

# %% [markdown]
# ## 3. The concise version
#
# The notes' concise model is `nn.GRU(num_inputs, num_hiddens)` inside `d2l.RNNModel`. `grulab.GRU`
# takes the same arguments, has the same parameters and computes the same thing (it is PyTorch's
# reset-after form by default), so a `torch.nn.GRU` state dict loads into it:

# %%
torch_gru = torch.nn.GRU(vocab_size, num_hiddens)
ours = grulab.GRU(vocab_size, num_hiddens)
ours.load_state_dict(torch_gru.state_dict())
with torch.no_grad():
    print("nn.GRU vs grulab.GRU: max |difference| =", (torch_gru(inputs)[0] - ours(inputs)[0]).abs().max().item())

# %% [markdown]
# As a language model (one-hot input, the GRU, a linear output layer), and trained with the PyTorch
# notes' settings but the concise model's cell and initialisation: the preset's booleans and values
# can be turned back with the flags given (`--no-reset-before`, `--init torch`).

# %%
grulab_cli(["train", "--preset", "d2l", "--corpus", "austen", "--no-reset-before", "--init", "torch",
            "--max-minutes", str(MINUTES / 2), "--out", str(WORK / "concise"), "--overwrite", "--no-progress",
            "--predict-length", "30", *SMALL_FLAGS])

# %% [markdown]
# ## 4. Training with the notes' two setups
#
# `--preset d2l` is the PyTorch notes' run: the reset-before GRU with 256 hidden units, one-hot input,
# the first 10,000 characters, 32 × 35 sequential batches (the state carried from batch to batch),
# SGD at learning rate 1, clipping at 1. Its text is *The Time Machine* (`--corpus timemachine`, a
# download, cached after the first time); this notebook trains on the bundled *Pride and Prejudice*
# so that it runs offline. The text is cleaned as the notes clean theirs: lower case, letters only.
#
# `--max-minutes` cuts the notes' 500 epochs to a budget; whichever ends first stops the run.

# %%
grulab_cli(["train", "--preset", "d2l", "--corpus", "austen", "--max-minutes", str(MINUTES),
            "--out", str(WORK / "d2l"), "--overwrite", "--no-progress", *SMALL_FLAGS])

# %% [markdown]
# `--preset d2l-zh` is the MXNet notes' run: the reset-after GRU with b_hn = 0 (their `gru_rnn`
# multiplies R by H W_hh after the product, with one bias per gate outside it), the first 20,000
# characters of a Chinese text with newlines as spaces, SGD at learning rate 0.2 on the *summed*
# loss (their `loss.backward()` sums the per-token losses) clipped at 5, 200 epochs, and their
# prefixes 分开, 不分开, 战争中部队. Their corpus, a singer's lyrics, is not bundled; the preset's
# default corpus is tang300, Tang poems. On a text of the other script a preset takes the other
# notes' rule and prefixes: the cleaning and the prefixes follow the script of the corpus.

# %%
grulab_cli(["train", "--preset", "d2l-zh", "--max-minutes", str(MINUTES),
            "--out", str(WORK / "d2l-zh"), "--overwrite", "--no-progress", *SMALL_FLAGS])

# %%
for name in ("d2l", "d2l-zh"):
    rows = read_metrics(WORK / name / "metrics.jsonl")
    print(f"{name}: {rows[-1]['epoch']:.2f} epochs, train perplexity {rows[-1]['train_ppl']:.1f}, "
          f"validation perplexity {rows[-1]['val_ppl']:.1f}")
display(Image(filename=str(WORK / "d2l" / "perplexity.png")))

# %% [markdown]
# ## 5. Prediction from the notes' prefixes
#
# Greedy, as the notes' `predict`: the prefix is read, then each next character is the likeliest.
# After seconds of training expect repetitions; after the notes' hundreds of epochs, words.

# %%
for name in ("d2l", "d2l-zh"):
    run = checkpoint.load(WORK / name)
    for prefix in run.train["prefixes"]:
        print(f"{name}: {predict(run.model, run.vocab, prefix, 50)!r}")

# %% [markdown]
# ## 6. What the gates do
#
# `grulab viz` runs the trained model over a text and records every gate (with the equations above,
# `grulab.reference.trace`). An `.html` file is an interactive page (hover a character for its gates
# and the model's guesses); a `.png` file is a heatmap: the update gate Z and the reset gate R of
# every unit at every step, the units sorted by their mean Z over the text (those that keep their
# state most on top), and the means over the units below.

# %%
text = "it is a truth universally acknowledged that a single man in possession of a good fortune"
grulab_cli(["viz", str(WORK / "d2l"), "--text", text, "--out", str(WORK / "gates.html")])
grulab_cli(["viz", str(WORK / "d2l"), "--text", text, "--out", str(WORK / "gates.png")])
display(Image(filename=str(WORK / "gates.png")))

# %% [markdown]
# ## 7. Cat and mouse
#
# The notes motivate the gates with a sequence of many cats and one mouse: a cat tells the model
# nothing new (keep the state, Z ≈ 1), the mouse is worth writing down (Z drops). `grulab demo
# cat-mouse` makes that a task: say which animal, if any, appeared early in a long run of cats. A
# GRU and a tanh RNN of the same size are trained on the same batches at each distance.

# %%
result = catmouse.run(distances=(5, 20) if QUICK else (5, 25, 50), steps=40 if QUICK else 150,
                      out_dir=WORK / "catmouse")
display(Image(filename=result["plot"]))

# %% [markdown]
# ## 8. Exercises
#
# ### GRU against RNN, under the same conditions
#
# The same preset, data, seed and time budget; only the cell differs. tokens/s is the speed of a
# step; the perplexity reached in the same time is what the speed buys.

# %%
CMP = 0.03 if QUICK else 0.15  # minutes per run
base = with_preset(TrainConfig(), "d2l", dict(corpus="austen", epochs=0, max_minutes=CMP, progress=False,
                                               predict_length=30, out=str(WORK / "rnn-vs-gru"), **SMALL))
results = compare.run(compare.configs(base, "rnn,gru", None), WORK / "rnn-vs-gru", overwrite=True)
for r in results:
    print(f"{r['run']}: {r['parameters']:,} parameters, {r['tokens_per_s']:,.0f} tokens/s, "
          f"validation perplexity {r['val_ppl']:.2f} after {r['epochs']:.2f} epochs")
display(Image(filename=str(WORK / "rnn-vs-gru" / "perplexity.png")))

# %% [markdown]
# ### A hyperparameter: the number of hidden units
#
# The MXNet notes ask to vary the data size, the sequence length, the hidden size and the learning
# rate, and to watch the running time, the perplexity and the predictions. `grulab compare --sweep`
# varies one setting, here the hidden size (try `num_steps=`, `lr=` or `max_tokens=` too).

# %%
SWEEP = "hidden=16,32" if QUICK else "hidden=64,128,256"
results = compare.run(compare.configs(replace(base, out=str(WORK / "sweep")), "", SWEEP), WORK / "sweep",
                      overwrite=True)
for r in results:
    print(f"{r['run']}: validation perplexity {r['val_ppl']:.2f}, {r['tokens_per_s']:,.0f} tokens/s, "
          f"{r['prediction']!r}")
display(Image(filename=str(WORK / "sweep" / "perplexity.png")))

# %% [markdown]
# The same from the command line:
#
# ```sh
# grulab train --preset d2l --corpus timemachine --out runs/d2l          # the PyTorch notes, 500 epochs
# grulab train --preset d2l-zh --out runs/d2l-zh                          # the MXNet notes, 200 epochs
# grulab generate runs/d2l --prefix "time traveller" --temperature 0
# grulab viz runs/d2l-zh --text "床前明月光，疑是地上霜。" --out gates.png
# grulab compare --preset d2l --corpus timemachine --cells rnn,gru --max-minutes 1 --out runs/rnn-vs-gru
# grulab compare --preset d2l --corpus timemachine --sweep hidden=64,128,256 --max-minutes 1 --out runs/sweep
# grulab demo cat-mouse
# ```
