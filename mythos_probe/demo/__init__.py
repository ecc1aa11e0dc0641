"""The demo: the task the shipped model was trained on, its training, its checkpoint, and the
`mythos-probe demo` command that serves it on a mixed workload.

`tasks` generates modular arithmetic chains, `training` trains a `LoopedTransformer` on them while
recording the run, `checkpoint` loads the shipped weights (checking they match the task's version),
and `run` is the command. Nothing in the probe core imports this package.
"""
