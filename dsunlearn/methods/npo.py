"""NPO: -(2/beta) * log sigmoid(beta * (NLL_theta - NLL_ref)) on the forget set.

As in the NPO reference code, NLL is the whole answer's negative log-likelihood per example
(the sequence log-ratio), and the frozen vanilla model stands in for the retain-only model.
Unlike GA the loss saturates once the model is well below the reference, which is what
slows the collapse.
"""

import torch.nn.functional as F

from dsunlearn.methods.base import Method, example_nll_sum, logits_of, register


@register("npo")
class NPO(Method):
    uses_reference = True

    def forget_loss(self, model, batch, ref):
        beta = self.cfg.npo_beta
        ref_nll = example_nll_sum(self.reference_logits(ref, batch), batch["labels"])
        nll = example_nll_sum(logits_of(model, batch), batch["labels"])
        return (-(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll))).mean()
