"""GA: gradient ascent on the forget set, i.e. minimise -CE(forget)."""

from dsunlearn.methods.base import Method, example_ce, logits_of, register


@register("ga")
class GradientAscent(Method):
    def forget_loss(self, model, batch, ref):
        return -example_ce(logits_of(model, batch), batch["labels"]).mean()
