"""KL_Min: the forget step as GradDiff; the retain step adds KL(p_ref || p_theta).

The KL runs over the retain answers' tokens against the frozen vanilla model, which keeps
the retain distribution in place rather than only its top-1 answer. CE and KL come from one
fused sweep over both models' head outputs (`kernels.linear_kl_ce`).
"""

from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import mean_ce, mean_ce_kl


@register("kl_min")
class KLMin(Method):
    uses_retain = True
    uses_reference = True

    def forget_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=-1.0)

    def retain_loss(self, model, batch, ref):
        ref = self.require_reference(ref)
        cfg = self.cfg
        return mean_ce_kl(model, ref, batch, self.head, cfg.retain_weight, cfg.kl_weight)
