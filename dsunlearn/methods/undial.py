"""UNDIAL (Dong et al. 2024): self-distillation toward the model's own adjusted prediction.

Per answer token the teacher is the frozen vanilla model's distribution with the label's logit
lowered by gamma, p' = softmax(z_ref - gamma * onehot(y)); the forget step minimises
KL(p' || p_theta) averaged per example. The target keeps the rest of the distribution where
the model had it, so the loss is bounded (at 0) where gradient ascent's is not: the paper's
case for its stability. The fused op takes the shift inside its reference sweep
(`kernels.linear_kl_ce`, `ref_shift`): no [tokens x vocabulary] logits are built.
"""

from dsunlearn.errors import ConfigError
from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import mean_ce_kl


@register("undial")
class Undial(Method):
    uses_reference = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.undial_gamma <= 0:
            raise ConfigError("method.undial_gamma must be > 0 (the teacher's label-logit cut)")

    def forget_loss(self, model, batch, ref):
        ref = self.require_reference(ref)
        return mean_ce_kl(model, ref, batch, self.head, 0.0, 1.0, self.cfg.undial_gamma)
