"""NPO: -(2/beta) * log sigmoid(beta * (NLL_theta - NLL_ref)) on the forget set.

As in the NPO reference code, NLL is the whole answer's negative log-likelihood per example
(the sequence log-ratio), and the frozen vanilla model stands in for the retain-only model.
Unlike GA the loss saturates once the model is well below the reference, which is what
slows the collapse. The per-token log-probs come from the fused head op in its per-row mode:
the logsigmoid makes each token's gradient weight known only after the forward.
"""

import torch
import torch.nn.functional as F

from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import example_logprob_sums


@register("npo")
class NPO(Method):
    uses_reference = True

    def forget_loss(self, model, batch, ref):
        ref = self.require_reference(ref)
        beta = self.cfg.npo_beta
        with torch.no_grad():
            ref_nll = -example_logprob_sums(ref, batch)
        nll = -example_logprob_sums(model, batch, self.head)
        return (-(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll))).mean()
