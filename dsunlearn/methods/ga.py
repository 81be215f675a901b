"""GA: gradient ascent on the forget set, i.e. minimise -CE(forget)."""

from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import mean_ce


@register("ga")
class GradientAscent(Method):
    def forget_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=-1.0)
