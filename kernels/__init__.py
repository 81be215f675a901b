"""Triton ops, one module per kernel, each with a plain torch reference beside it.

Import from the module: `from kernels.dual_masked_kl_ce import dual_masked_kl_ce`.
"""
