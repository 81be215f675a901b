"""GradDiff: a forget step on -CE(forget), then a separate retain step on +CE(retain)."""

from dsunlearn.methods.base import Method, example_ce, logits_of, register


@register("graddiff")
class GradDiff(Method):
    uses_retain = True

    def forget_loss(self, model, batch, ref):
        return -example_ce(logits_of(model, batch), batch["labels"]).mean()

    def retain_loss(self, model, batch, ref):
        ce = example_ce(logits_of(model, batch), batch["labels"]).mean()
        return self.cfg.retain_weight * ce
