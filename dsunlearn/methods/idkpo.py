"""IdkPO: DPO with a refusal as the preferred answer and the true answer as the rejected one.

Forget step, per forget question x with true answer y_l and a refusal y_w:
    -log sigmoid(beta * [(log p_theta(y_w|x) - log p_ref(y_w|x))
                         - (log p_theta(y_l|x) - log p_ref(y_l|x))])
averaged over the batch (whole-answer log-probabilities, as DPO). The reference is the frozen
vanilla model. Then a retain step, CE on the retain VQA (`method.retain_weight`), as GradDiff.
This is SIU's "PO" baseline (and TOFU's IDK preference variant).

The refusal of a question is picked from `REFUSALS` by a hash of the question text, not by an
RNG: the pick must not depend on which rank holds the example, or 1 and 2 ranks would train on
different pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsunlearn.errors import ConfigError
from dsunlearn.methods.base import Method, register
from dsunlearn.models.lm_head import example_logprob_sums, mean_ce

# Short refusals in the benchmarks' answer register; `method.idkpo_refusals=FILE` (one per line)
# replaces them.
REFUSALS = (
    "I don't know.",
    "I'm not sure who this is.",
    "I can't tell who this person is.",
    "I have no information about this person.",
    "I don't recognise this person.",
    "That is not something I know.",
    "I'm unable to answer that.",
    "I can't help with that question.",
)


def load_refusals(path: str) -> tuple[str, ...]:
    if not path:
        return REFUSALS
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"method.idkpo_refusals: file not found: {path}")
    lines = tuple(ln.strip() for ln in file.read_text().splitlines() if ln.strip())
    if not lines:
        raise ConfigError(f"method.idkpo_refusals: no refusal in {path}")
    return lines


def refusal_for(question: str, refusals: tuple[str, ...]) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return refusals[int.from_bytes(digest[:4], "little") % len(refusals)]


@register("idkpo")
class IdkPO(Method):
    uses_retain = True
    uses_reference = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.idkpo_beta <= 0:
            raise ConfigError("method.idkpo_beta must be > 0")
        self.refusals = load_refusals(cfg.idkpo_refusals)

    def views(self, examples: list, rng: np.random.Generator) -> list:
        """The step's B true-answer examples, then the same B questions with a refusal: one
        batch, so both answers of a pair go through the same forward."""
        idk = [
            dataclasses.replace(e, answer=refusal_for(e.question, self.refusals)) for e in examples
        ]
        return [*examples, *idk]

    def forget_loss(self, model, batch, ref):
        ref = self.require_reference(ref)
        with torch.no_grad():
            ref_lp = example_logprob_sums(ref, batch)
        lp = example_logprob_sums(model, batch, self.head)
        ratio = lp - ref_lp
        rejected, preferred = ratio.chunk(2)
        return -F.logsigmoid(self.cfg.idkpo_beta * (preferred - rejected)).mean()

    def retain_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=self.cfg.retain_weight)
