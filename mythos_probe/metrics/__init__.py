"""Metric formulas, one module per family, each function citing its source.

Functions take torch tensors already on the model's device and return tensors (never Python
numbers): reductions stay on the device and the recorder moves everything to the host once per
forward. Shapes: B batch, T sequence, D model dim, N = B·T tokens, E experts, k top-k, V vocab.
"""
