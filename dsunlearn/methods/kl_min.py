"""KL_Min: the forget step as GradDiff; the retain step adds KL(p_ref || p_theta).

The KL runs over the retain answers' tokens against the frozen vanilla model, which keeps
the retain distribution in place rather than only its top-1 answer.
"""

from dsunlearn.methods.base import Method, example_ce, example_kl, logits_of, register


@register("kl_min")
class KLMin(Method):
    uses_retain = True
    uses_reference = True

    def forget_loss(self, model, batch, ref):
        return -example_ce(logits_of(model, batch), batch["labels"]).mean()

    def retain_loss(self, model, batch, ref):
        ref_logits = self.reference_logits(ref, batch)
        logits = logits_of(model, batch)
        ce = example_ce(logits, batch["labels"])
        kl = example_kl(ref_logits, logits, batch["labels"])
        return (self.cfg.retain_weight * ce + self.cfg.kl_weight * kl).mean()
