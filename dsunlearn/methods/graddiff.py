"""GradDiff: a forget step on -CE(forget), then a separate retain step on +CE(retain)."""

from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import mean_ce


@register("graddiff")
class GradDiff(Method):
    uses_retain = True

    def forget_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=-1.0)

    def retain_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=self.cfg.retain_weight)
