"""SimNPO (Fan et al. 2024): NPO without a reference model, length-normalised, with a margin.

Forget step: -(2/beta) * log sigmoid(-(beta/|y|) * log p_theta(y|x) - gamma), per example,
averaged over the batch. Dividing by the answer length |y| keeps long answers from dominating,
which is why it needs no reference model; the margin gamma shifts where the loss saturates.
The retain step (the paper's lambda * NLL term, `method.retain_weight`; 0 turns it off) is a
separate optimizer step as in GradDiff.
"""

import torch.nn.functional as F

from dsunlearn.errors import ConfigError
from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import answer_lengths, example_logprob_sums, mean_ce


@register("simnpo")
class SimNPO(Method):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.simnpo_beta <= 0:
            raise ConfigError("method.simnpo_beta must be > 0")
        self.uses_retain = cfg.retain_weight > 0

    def forget_loss(self, model, batch, ref):
        beta, gamma = self.cfg.simnpo_beta, self.cfg.simnpo_gamma
        logp = example_logprob_sums(model, batch, self.head)
        mean_logp = logp / answer_lengths(batch).clamp(min=1).to(logp)
        return (-(2.0 / beta) * F.logsigmoid(-beta * mean_logp - gamma)).mean()

    def retain_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=self.cfg.retain_weight)
