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
# # 门控循环单元（GRU）：用 grulab 逐格运行
#
# 这是 d2l 笔记中 GRU 一章的可运行版本：公式与实现它们的代码逐行对照；笔记中从零开始实现的 GRU
# 与 `grulab.GRU` 逐一核对；简洁实现；用笔记的两种训练设置训练；用笔记的前缀做预测；观察门的取值；
# 猫和老鼠的例子；以及笔记的两道练习。
#
# 本笔记本对照两份笔记：
#
# * **d2l PyTorch 笔记**：从零实现的 GRU 在《时间机器》上训练，批量 32 × 35，SGD 学习率 1，
#   梯度裁剪 1，500 个迭代周期：`grulab train --preset d2l`；
# * **d2l MXNet 笔记**：从零实现的 GRU 在中文歌词上训练，批量同样是 32 × 35，SGD 学习率 0.2，
#   梯度裁剪 5，200 个迭代周期：`grulab train --preset d2l-zh`。
#
# 整个笔记本在普通 CPU 上大约两分钟跑完：每次训练只给几十秒，而不是笔记中的几百个迭代周期。
# 想看模型学到更多，把下面的 `MINUTES` 调大即可。

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

# 测试套件以 GRULAB_NOTEBOOK_QUICK=1 运行本笔记本：同样的单元格，极小的时间预算，
# 以及更小的模型和验证集（SMALL）；读者自己运行时保持笔记的规模。
QUICK = os.environ.get("GRULAB_NOTEBOOK_QUICK") == "1"
MINUTES = 0.05 if QUICK else 0.4  # 每个预设的训练时间（分钟）；笔记训练几百个迭代周期
SMALL = dict(hidden=32) if QUICK else {}
SMALL_FLAGS = [w for k, v in SMALL.items() for w in ("--" + k.replace("_", "-"), str(v))]
WORK = Path(os.environ.get("GRULAB_NOTEBOOK_OUT", "runs/notebook-zh"))
WORK.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
print("grulab", grulab.__version__, "· torch", torch.__version__, "· 输出目录", WORK)
print("图中的中文字体：", plots.cjk_fonts() or "未找到（" + plots.CJK_FIX + "）")

# %% [markdown]
# ## 1. 公式与代码逐行对照
#
# 给定小批量输入 $\mathbf{X}_t \in \mathbb{R}^{n \times d}$ 和上一时间步的隐状态
# $\mathbf{H}_{t-1} \in \mathbb{R}^{n \times h}$：
#
# $$\mathbf{R}_t = \sigma(\mathbf{X}_t \mathbf{W}_{xr} + \mathbf{H}_{t-1} \mathbf{W}_{hr} + \mathbf{b}_r)
# \qquad \text{重置门}$$
#
# $$\mathbf{Z}_t = \sigma(\mathbf{X}_t \mathbf{W}_{xz} + \mathbf{H}_{t-1} \mathbf{W}_{hz} + \mathbf{b}_z)
# \qquad \text{更新门}$$
#
# $$\tilde{\mathbf{H}}_t = \tanh(\mathbf{X}_t \mathbf{W}_{xh} + (\mathbf{R}_t \odot \mathbf{H}_{t-1})
# \mathbf{W}_{hh} + \mathbf{b}_h) \qquad \text{候选隐状态}$$
#
# $$\mathbf{H}_t = \mathbf{Z}_t \odot \mathbf{H}_{t-1} + (1 - \mathbf{Z}_t) \odot \tilde{\mathbf{H}}_t
# \qquad \text{隐状态}$$
#
# `grulab.reference.gru_step` 就是这四个公式，每个公式一行代码。权重按 `torch.nn.GRU` 的方式存放
# （`w_ih` 按 r | z | n 的顺序叠放 $\mathbf{W}_{xr}^\top, \mathbf{W}_{xz}^\top, \mathbf{W}_{xh}^\top$）。
# `reset_after=False` 是上面的候选隐状态（PyTorch 笔记）；`reset_after=True` 在矩阵乘法之后再乘重置门，
# 即 $\mathbf{R}_t \odot (\mathbf{H}_{t-1}\mathbf{W}_{hh})$，这是 PyTorch、cuDNN 以及 MXNet 笔记的写法。

# %%
print(inspect.getsource(reference.gru_step))

# %% [markdown]
# 重置门接近 1 时，候选隐状态就是普通 RNN 的一步；重置门接近 0 时，它丢弃过去的隐状态，相当于以
# $\mathbf{X}_t$ 为输入的多层感知机。更新门接近 1 时，旧的隐状态被原样保留（跳过这一时间步）；
# 更新门接近 0 时，新的隐状态接近候选隐状态。

# %% [markdown]
# ## 2. 从零开始实现，并与 `grulab.GRU` 核对
#
# 下面是 PyTorch 笔记的 `get_params` 和 `gru`（每个门一个偏置，权重取自 N(0, 0.01²)），以及 MXNet
# 笔记的 `gru_rnn`（重置门乘在 H W_hh 之后）。把同样的参数放进 `grulab.GRU`，输出应当一致。

# %%
vocab_size, num_hiddens = 28, 32


def get_params(vocab_size, num_hiddens):
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape) * 0.01

    def three():
        return (normal((num_inputs, num_hiddens)), normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens))

    W_xz, W_hz, b_z = three()  # 更新门参数
    W_xr, W_hr, b_r = three()  # 重置门参数
    W_xh, W_hh, b_h = three()  # 候选隐状态参数
    W_hq, b_q = normal((num_hiddens, num_outputs)), torch.zeros(num_outputs)  # 输出层参数
    return [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]


def gru(inputs, state, params):  # PyTorch 笔记：(R ⊙ H) W_hh
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    H, = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H) @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        outputs.append(H)  # 隐状态；笔记在这里再接输出层
    return torch.stack(outputs), (H,)


def gru_rnn(inputs, H, *params):  # MXNet 笔记：R * (H W_hh)，重置门在矩阵乘法之后
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
    """把笔记的参数放进 grulab.GRU：按门的顺序 r | z | n 叠放，第二组偏置为零。"""
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
    p.normal_(0, 0.1)  # 偏置取非零值，让核对也覆盖偏置
inputs = F.one_hot(torch.randint(vocab_size, (35, 4)), vocab_size).float()  # (T, B, V)：35 个时间步，批量 4
H0 = torch.zeros(4, num_hiddens)
with torch.no_grad():
    ours, _ = as_grulab(params, reset_after=False)(inputs, H0[None])
    notes, _ = gru(inputs, (H0,), params)
    ours_mx, _ = as_grulab(params, reset_after=True)(inputs, H0[None])
    notes_mx, _ = gru_rnn(inputs, H0, *params)
print("PyTorch 笔记 与 grulab.GRU(reset_after=False)：最大绝对误差", (ours - notes).abs().max().item())
print("MXNet 笔记   与 grulab.GRU(reset_after=True)，b_hn = 0：最大绝对误差", (ours_mx - notes_mx).abs().max().item())
assert torch.allclose(ours, notes, atol=1e-6) and torch.allclose(ours_mx, notes_mx, atol=1e-6)

# %% [markdown]
# `grulab train --init d2l` 像 `get_params` 一样初始化模型，并把 PyTorch 参数布局中多出的第二组偏置
# 固定为零，所以每个门只有一个偏置，与笔记相同。

# %% [markdown]
# ## 3. 简洁实现
#
# 笔记的简洁实现是 `d2l.RNNModel` 中的 `nn.GRU(num_inputs, num_hiddens)`。`grulab.GRU` 接受同样的参数、
# 有同样的参数名、算的是同样的东西（默认是 PyTorch 的“重置门在乘法之后”的形式），所以可以直接载入
# `torch.nn.GRU` 的参数：

# %%
torch_gru = torch.nn.GRU(vocab_size, num_hiddens)
ours = grulab.GRU(vocab_size, num_hiddens)
ours.load_state_dict(torch_gru.state_dict())
with torch.no_grad():
    print("nn.GRU 与 grulab.GRU：最大绝对误差", (torch_gru(inputs)[0] - ours(inputs)[0]).abs().max().item())

# %% [markdown]
# 作为语言模型（独热输入、GRU、线性输出层）训练：沿用 PyTorch 笔记的设置，但换成简洁实现的门和初始化。
# 预设里的布尔值和取值都可以用命令行参数改回去（`--no-reset-before`、`--init torch`）。

# %%
grulab_cli(["train", "--preset", "d2l", "--corpus", "tang300", "--no-reset-before", "--init", "torch",
            "--max-minutes", str(MINUTES / 2), "--out", str(WORK / "concise"), "--overwrite", "--no-progress",
            "--predict-length", "30", *SMALL_FLAGS])

# %% [markdown]
# ## 4. 用笔记的两种设置训练
#
# `--preset d2l-zh` 是 MXNet 笔记的训练：GRU 的重置门乘在 H W_hh 之后，门外各有一个偏置（即 PyTorch
# 形式且 b_hn = 0）；取中文文本的前 20,000 个字符，换行替换为空格；32 × 35 的相邻批量（隐状态在批量之间
# 传递）；SGD 学习率 0.2，作用于**求和**的损失（笔记的 `loss.backward()` 把每个字符的损失加起来），
# 梯度裁剪 5；预测前缀“分开”“不分开”“战争中部队”。笔记用的歌词语料没有随 grulab 打包，
# 预设默认用 tang300（唐诗三百首）。
#
# `--max-minutes` 把笔记的 200 个迭代周期换成时间预算，两者先到者为准。

# %%
grulab_cli(["train", "--preset", "d2l-zh", "--max-minutes", str(MINUTES),
            "--out", str(WORK / "d2l-zh"), "--overwrite", "--no-progress", *SMALL_FLAGS])

# %% [markdown]
# `--preset d2l` 是 PyTorch 笔记的训练：重置门在乘法之前的 GRU，256 个隐藏单元，独热输入，前 10,000 个
# 字符，SGD 学习率 1，梯度裁剪 1。笔记在英文的《时间机器》上训练（`--corpus timemachine`，首次使用时下载），
# 只保留字母；在中文文本上，预设改用 MXNet 笔记的规则（换行变空格）和它的前缀：
# 文本清洗和前缀都随语料的文字而定。

# %%
grulab_cli(["train", "--preset", "d2l", "--corpus", "tang300", "--max-minutes", str(MINUTES),
            "--out", str(WORK / "d2l"), "--overwrite", "--no-progress", *SMALL_FLAGS])

# %%
for name in ("d2l-zh", "d2l"):
    rows = read_metrics(WORK / name / "metrics.jsonl")
    print(f"{name}：{rows[-1]['epoch']:.2f} 个迭代周期，训练困惑度 {rows[-1]['train_ppl']:.1f}，"
          f"验证困惑度 {rows[-1]['val_ppl']:.1f}")
display(Image(filename=str(WORK / "d2l-zh" / "perplexity.png")))

# %% [markdown]
# 验证集是语料末尾的其他诗（笔记没有验证集）；语料只有三万多字、两千八百多个不同的字，模型很快就会
# 过拟合：对比训练困惑度和验证困惑度。

# %% [markdown]
# ## 5. 用笔记的前缀预测
#
# 与笔记的 `predict` 一样用贪心解码：先读入前缀，然后每一步取可能性最大的字。只训练几十秒时会不断重复；
# 训练到笔记的几百个迭代周期，会先学到单个字，再到词，再到像样的句子。

# %%
for name in ("d2l-zh", "d2l"):
    run = checkpoint.load(WORK / name)
    for prefix in run.train["prefixes"]:
        print(f"{name}：{predict(run.model, run.vocab, prefix, 30)!r}")

# %% [markdown]
# ## 6. 门在做什么
#
# `grulab viz` 让训练好的模型读一段文本，记下每个门的取值（用上面的公式，`grulab.reference.trace`）。
# 输出 `.html` 是可交互的页面（鼠标悬停在字上可以看到它的门和模型的预测）；输出 `.png` 是热图：
# 每个单元在每个时间步的更新门 Z 和重置门 R，单元按它在这段文本上的更新门均值从高到低排列
# （最常保留隐状态的在最上面），下方是所有单元的均值。

# %%
poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
grulab_cli(["viz", str(WORK / "d2l-zh"), "--text", poem, "--out", str(WORK / "gates.html")])
grulab_cli(["viz", str(WORK / "d2l-zh"), "--text", poem, "--out", str(WORK / "gates.png")])
display(Image(filename=str(WORK / "gates.png")))

# %% [markdown]
# ## 7. 猫和老鼠
#
# 笔记用“猫猫猫……老鼠……猫猫”来说明为什么需要门：猫没有带来新信息（保留隐状态，更新门 ≈ 1），
# 老鼠值得记下来（更新门下降）。`grulab demo cat-mouse` 把它做成一个任务：在一长串猫之后回答前面
# 出现过哪种动物。同样大小的 GRU 和 tanh RNN 在每个距离上用同样的批量训练。

# %%
result = catmouse.run(distances=(5, 20) if QUICK else (5, 25, 50), steps=40 if QUICK else 150,
                      out_dir=WORK / "catmouse")
display(Image(filename=result["plot"]))

# %% [markdown]
# ## 8. 练习
#
# ### 在相同条件下，比较门控循环单元和循环神经网络的运行效率
#
# 同样的预设、数据、随机种子和时间预算，只有单元不同。tokens/s 是每一步的速度；
# 同样时间内达到的困惑度才是速度换来的结果。

# %%
CMP = 0.03 if QUICK else 0.15  # 每次运行的分钟数
base = with_preset(TrainConfig(), "d2l-zh", dict(epochs=0, max_minutes=CMP, progress=False, predict_length=20,
                                                  out=str(WORK / "rnn-vs-gru"), **SMALL))
results = compare.run(compare.configs(base, "rnn,gru", None), WORK / "rnn-vs-gru", overwrite=True)
for r in results:
    print(f"{r['run']}：{r['parameters']:,} 个参数，每秒 {r['tokens_per_s']:,.0f} 个字，"
          f"{r['epochs']:.2f} 个迭代周期后验证困惑度 {r['val_ppl']:.1f}")
plots.compare_curves(results, WORK / "rnn-vs-gru-zh.png", title="相同条件下的 GRU 与 RNN",
                     xlabels=("迭代周期", "时间（秒）"), ylabel="验证困惑度",
                     names={"rnn": "循环神经网络 (RNN)", "gru": "门控循环单元 (GRU)"})
display(Image(filename=str(WORK / "rnn-vs-gru-zh.png")))

# %% [markdown]
# ### 调参：隐藏单元数
#
# MXNet 笔记的练习：调整数据集大小、序列长度、隐状态长度和学习率，看它们对运行时间、困惑度和预测结果
# 的影响。`grulab compare --sweep` 每次改变一个设置，这里是隐藏单元数（也可以试 `num_steps=`、`lr=`、
# `max_tokens=`）。

# %%
SWEEP = "hidden=16,32" if QUICK else "hidden=64,128,256"
results = compare.run(compare.configs(replace(base, out=str(WORK / "sweep")), "", SWEEP), WORK / "sweep",
                      overwrite=True)
for r in results:
    print(f"{r['run']}：验证困惑度 {r['val_ppl']:.1f}，每秒 {r['tokens_per_s']:,.0f} 个字，{r['prediction']!r}")
plots.compare_curves(results, WORK / "sweep-zh.png", title="隐藏单元数的影响（tang300，d2l-zh 预设）",
                     xlabels=("迭代周期", "时间（秒）"), ylabel="验证困惑度",
                     names={r["run"]: "隐藏单元 " + r["run"].split("=")[1] for r in results})
display(Image(filename=str(WORK / "sweep-zh.png")))

# %% [markdown]
# 命令行中的对应写法：
#
# ```sh
# grulab train --preset d2l-zh --out runs/d2l-zh                          # MXNet 笔记，200 个迭代周期
# grulab train --preset d2l --corpus timemachine --out runs/d2l          # PyTorch 笔记，500 个迭代周期
# grulab generate runs/d2l-zh --prefix 分开 --temperature 0
# grulab viz runs/d2l-zh --text "床前明月光，疑是地上霜。" --out gates.png
# grulab compare --preset d2l-zh --cells rnn,gru --max-minutes 1 --out runs/rnn-vs-gru
# grulab compare --preset d2l-zh --sweep hidden=64,128,256 --max-minutes 1 --out runs/sweep
# grulab demo cat-mouse
# ```
