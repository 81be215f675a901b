from kernels.dual_masked_kl_ce import dual_masked_kl_ce, dual_masked_kl_ce_reference  # noqa: F401
