"""The character-level language model of the notes, made into a tool.

:mod:`~grulab.lm.data` (corpora, vocabularies, the notes' minibatches), :mod:`~grulab.lm.model`
(embedding or one-hot, a recurrent stack, a linear head), :mod:`~grulab.lm.settings`
(TrainConfig, the presets), :mod:`~grulab.lm.train` (the loop), :mod:`~grulab.lm.generate`,
:mod:`~grulab.lm.checkpoint`, :mod:`~grulab.lm.rundir` and :mod:`~grulab.lm.signals` (runs that
lose nothing), :mod:`~grulab.lm.distributed` (torchrun), :mod:`~grulab.lm.compare` (sweeps),
:mod:`~grulab.lm.plots` (perplexity curves), :mod:`~grulab.lm.config` and
:mod:`~grulab.lm.validate` (flags and saved configs checked in one place).
"""
