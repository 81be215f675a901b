"""Each benchmark's own evaluation protocol, for `dsunlearn eval --benchmark NAME`.

Every function that touches a model must be called by all ranks together (the items are
sharded over ranks as in `scoring.py`, so it works on ZeRO-3 sharded weights).

- ``builtin`` (the demo's benchmark): the metric suite of `evaluate.evaluate` unchanged;
  ``mllmu``: MLLMU-Bench's own protocol (`mllmu_protocol.py`). Both add loss-based membership
  inference `mia_mink20_auc_forget_vs_heldout`: the ROC AUC of min-k% (k = 20) token
  log-probability telling *members* (the forget people's training VQA pairs, `metadata`, on
  their training images) from *non-members* (the same pairs on the same people's held-out
  Test_Set images, which no model was trained on). The answer text is the same on both sides:
  only whether the picture was seen differs, which is what visual unlearning is about. 0.5 = the
  training pictures no longer stand out.
- ``clear`` (CLEAR, hub `therem/CLEAR`), forget percentage `--forget-pct` (1, 5 or 10):
  `forget_name_mc_acc` / `retain_name_mc_acc` (the person's name among its `perturbed_names`,
  on `forgetXX_perturbed` / `retain_perturbed`), `forget_caption_rouge_l` /
  `retain_caption_rouge_l` (greedy caption of `forgetXX` / `retainXX` pictures vs the caption),
  `forget_text_qa_rouge_l` / `retain_text_qa_rouge_l` (TOFU text QA rows of the `+tofu` configs),
  `real_faces_acc` and `real_world_acc` (multiple choice). Multiple choice is scored by mean
  token log-likelihood (chance 0.25 with four options). Membership inference
  `mia_mink20_auc_caption_vs_perturbed`: min-k% (k = 20) ROC AUC telling *members* (each
  `forgetXX_perturbed` picture with its true caption, which unlearning trains on) from
  *non-members* (the same picture with each of its `perturbed_captions`: same style, same person,
  never in any training set). CLEAR has no never-seen pictures of the forget people, so the
  text is what differs here; 0.5 = the true caption no longer stands out.
- ``mmubench`` (SIU's MMUBench layout, `data/mmubench.py`; every concept of the folder is a
  forget concept): `eff`, `gen`, `div`, `flu` (the SIU metric code of the built-in suite, on each
  concept's probing prompts with its training image and its test images), `mia_rouge_l_recall`
  (MIA prompts on the training image, ROUGE-L recall against the original model's answers: needs
  `--vanilla`), `jailbreak_leak_rate` and per type `jailbreak_multilingual_leak_rate` /
  `jailbreak_multi_hop_leak_rate` (the rule judge `judge.JUDGE_NAME`: name, aliases or the
  prompt's `reveals`), and `c_dis` (`mia.concept_kl` between the original and the evaluated
  model's next-token distributions, coarsened to the concept's name/alias tokens, averaged over
  the answer positions of the original model's probe answers: needs `--vanilla`), and
  `mia_mink20_auc_train_vs_test_image` (min-k% (k = 20) ROC AUC, members = each concept's
  `facts` pairs asked about its training image, non-members = the same pairs about its test
  images: same text, only whether the picture was trained on differs; omitted when no concept
  has facts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsunlearn.config import EvalConfig
from dsunlearn.data import clear as clear_data
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.data.examples import (
    GenExample,
    MCExample,
    ProbeExample,
    QAExample,
    subsample,
)
from dsunlearn.data.mmubench import MMUBench
from dsunlearn.data.siu import name_token_ids
from dsunlearn.engine.batches import shard_for_rank, to_device
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.eval.evaluate import EvalSets, _per_rank, probe_max_new_tokens
from dsunlearn.eval.judge import judge_answers
from dsunlearn.eval.metrics import mia_rouge_recall, name_choice_options
from dsunlearn.eval.mia import answer_token_logprobs, auc, concept_kl, min_k_percent
from dsunlearn.eval.scoring import generate_answers
from dsunlearn.models.encode import IGNORE_INDEX, encode_for_loss, logits_of

BENCHMARKS = ("builtin", "mllmu", "clear", "mmubench")
MINK_K = 20.0
MIA_KEY = "mia_mink20_auc_forget_vs_heldout"  # builtin / mllmu
CLEAR_MIA_KEY = "mia_mink20_auc_caption_vs_perturbed"
MMU_MIA_KEY = "mia_mink20_auc_train_vs_test_image"

# CLEAR prompts (the dataset has captions and names but no question for them).
NAME_PROMPT = "The name of the person on the image is"
CAPTION_PROMPT = "Describe the person in this picture."


def check_benchmark(name: str) -> str:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    return name


# ---------------------------------------------------------------------------------------------
# Sharded per-row scoring on teacher-forced answers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def map_answer_rows(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    answers: Sequence[str],
    per_rank_batch: int,
    info: DistInfo,
    fn: Callable[[torch.Tensor, torch.Tensor, list[int]], list[Any]],
) -> list[Any]:
    """`fn(logits, labels, rows)` (`rows`: each row's item index) -> one value per row, for every (item question + image, answer),
    teacher-forced; items sharded over ranks (padded rows run, then are dropped) and the values
    gathered to every rank in item order. All ranks must call this together."""
    import torch.distributed as dist

    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items for {len(answers)} answers")
    local: dict[int, Any] = {}
    for idxs in shard_for_rank(len(items), per_rank_batch, info.rank, info.world_size):
        real = [i if i >= 0 else 0 for i in idxs]
        batch = encode_for_loss(
            processor,
            [items[i].question for i in real],
            [items[i].image for i in real],
            [answers[i] for i in real],
        )
        batch = to_device(batch, info.device)
        values = fn(logits_of(model, batch), batch["labels"], real)
        for i, v in zip(idxs, values, strict=True):
            if i >= 0:
                local[i] = v
    if info.world_size > 1:
        parts: list[dict[int, Any]] = [{} for _ in range(info.world_size)]
        dist.all_gather_object(parts, local)
        for p in parts:
            local.update(p)
    return [local[i] for i in range(len(items))]


def min_k_scores(
    model: Any,
    processor: Any,
    items: Sequence[QAExample],
    per_rank_batch: int,
    info: DistInfo,
    k: float = MINK_K,
) -> list[float]:
    """Min-k% token log-probability of each item's answer (higher = more likely a member)."""

    def fn(logits: torch.Tensor, labels: torch.Tensor, _rows: list[int]) -> list[float]:
        lp, mask = answer_token_logprobs(logits, labels)
        return min_k_percent(lp.cpu(), mask.cpu(), k).tolist()

    return map_answer_rows(
        model, processor, items, [it.answer for it in items], per_rank_batch, info, fn
    )


# ---------------------------------------------------------------------------------------------
# builtin / mllmu: membership inference on top of the standard suite
# ---------------------------------------------------------------------------------------------


@dataclass
class MiaSets:
    members: list[QAExample]
    nonmembers: list[QAExample]


def _capped(
    members: list[QAExample], nonmembers: list[QAExample], cfg: EvalConfig, seed: int
) -> MiaSets:
    """Each side capped at `cfg.max_items`, by its own seed."""
    return MiaSets(
        members=subsample(members, cfg.max_items, seed),
        nonmembers=subsample(nonmembers, cfg.max_items, seed + 1),
    )


def mllmu_mia_sets(bench: Benchmark, cfg: EvalConfig, seed: int = 0) -> MiaSets:
    """Members: each forget person's training VQA pairs on each training image; non-members:
    the same pairs on each of that person's held-out Test_Set images (never trained on)."""
    members, nonmembers = [], []
    heldout = {r.id: r.images for r in bench.test_forget}
    for r in bench.forget:
        for q, a in r.metadata:
            members += [QAExample(q, a, im, r.id) for im in r.images]
            nonmembers += [QAExample(q, a, im, r.id) for im in heldout.get(r.id, [])]
    return _capped(members, nonmembers, cfg, seed)


def clear_mia_sets(path: str, forget_pct: int, cfg: EvalConfig, seed: int = 0) -> MiaSets:
    """Members: each `forgetXX_perturbed` picture with its true caption (the one unlearning
    trains on); non-members: the same picture with each of its `perturbed_captions` (never
    trained on, same style and person). Only the text differs: CLEAR has no held-out pictures
    of the forget people."""
    config = clear_data.forget_config(forget_pct) + "_perturbed"
    members, nonmembers = [], []
    for r in clear_data.load_clear(path, config).captions:
        entity = r.name or ""
        members.append(QAExample(CAPTION_PROMPT, r.caption, r.image, entity))
        nonmembers += [QAExample(CAPTION_PROMPT, c, r.image, entity) for c in r.perturbed_captions]
    return _capped(members, nonmembers, cfg, seed)


def mmubench_mia_sets(bench: MMUBench, cfg: EvalConfig, seed: int = 0) -> MiaSets:
    """Members: each concept's `facts` pairs about its training image; non-members: the same
    pairs about each of its test images (never trained on). Only the picture differs."""
    members, nonmembers = [], []
    for c in bench.concepts:
        for q, a in c.facts:
            members.append(QAExample(q, a, c.train_image, c.id))
            nonmembers += [QAExample(q, a, im, c.id) for im in c.test_images]
    return _capped(members, nonmembers, cfg, seed)


def mia_mink_auc(
    model: Any,
    processor: Any,
    sets: MiaSets,
    cfg: EvalConfig,
    info: DistInfo,
    key: str = MIA_KEY,
) -> dict[str, float]:
    """{key: AUC}; {} when either side is empty (e.g. no Test_Set images of forget people)."""
    if not sets.members or not sets.nonmembers:
        return {}
    was_training = model.training
    model.eval()
    try:
        per_rank = _per_rank(cfg, info)
        pos = min_k_scores(model, processor, sets.members, per_rank, info)
        neg = min_k_scores(model, processor, sets.nonmembers, per_rank, info)
    finally:
        model.train(was_training)
    return {key: auc(pos, neg)}


# ---------------------------------------------------------------------------------------------
# CLEAR
# ---------------------------------------------------------------------------------------------


def clear_sets(path: str, forget_pct: int, cfg: EvalConfig, seed: int = 0) -> EvalSets:
    """CLEAR's evaluation sets for `forget_pct` (1, 5 or 10); a config missing from `path` or
    with the wrong columns is a one-line DataError."""
    forget = clear_data.forget_config(forget_pct)
    retain = clear_data.retain_config(forget_pct)

    def cap(items: list[Any]) -> list[Any]:
        return subsample(items, cfg.max_items, seed)

    def name_mc(config: str) -> list[MCExample]:
        out = []
        for i, row in enumerate(clear_data.load_clear(path, config).captions):
            if not row.name:
                continue
            options, answer = name_choice_options(row.name, row.perturbed_names, position=i)
            if len(options) > 1:
                out.append(MCExample(NAME_PROMPT, options, answer, row.image, row.name))
        return out

    def choice_mc(config: str) -> list[MCExample]:
        out = []
        for i, row in enumerate(clear_data.load_clear(path, config).choices):
            options, answer = name_choice_options(row.answer, row.options, position=i)
            question = row.question or NAME_PROMPT
            out.append(MCExample(question, options, answer, row.image, row.answer))
        return out

    def captions(config: str) -> list[GenExample]:
        rows = clear_data.load_clear(path, config).captions
        return [GenExample(CAPTION_PROMPT, r.caption, r.image, r.name or "") for r in rows]

    def text_qa(config: str) -> list[GenExample]:
        rows = clear_data.load_clear(path, config).text_qa
        return [GenExample(r.question, r.answer, None, "") for r in rows]

    mc = {
        "forget_name_mc_acc": cap(name_mc(forget + "_perturbed")),
        "retain_name_mc_acc": cap(name_mc("retain_perturbed")),
        "real_faces_acc": cap(choice_mc("real_faces")),
        "real_world_acc": cap(choice_mc("real_world")),
    }
    gen = {
        "forget_caption_rouge_l": cap(captions(forget)),
        "retain_caption_rouge_l": cap(captions(retain)),
        "forget_text_qa_rouge_l": cap(text_qa(forget + "+tofu")),
        "retain_text_qa_rouge_l": cap(text_qa(retain + "+tofu")),
    }
    if not mc["forget_name_mc_acc"] or not gen["forget_caption_rouge_l"]:
        raise DataError(f"{path}: CLEAR config '{forget}' has no picture of a named person")
    return EvalSets(mc=mc, gen=gen, probes=[])


# ---------------------------------------------------------------------------------------------
# MMUBench
# ---------------------------------------------------------------------------------------------


@dataclass
class MMUBenchSets:
    probes: list[ProbeExample]  # eff / gen / div / flu
    mia: list[GenExample]  # MIA prompts on the training image
    jailbreak: list[GenExample]  # jailbreak prompts on the training image
    jailbreak_types: list[str]
    names: list[str] = field(default_factory=list)  # per jailbreak prompt
    aliases: list[list[str]] = field(default_factory=list)
    reveals: list[list[str]] = field(default_factory=list)
    concept_terms: dict[str, list[str]] = field(default_factory=dict)  # id -> name + aliases

    @property
    def eval_sets(self) -> EvalSets:
        return EvalSets(mc={}, gen={}, probes=self.probes)


def mmubench_sets(bench: MMUBench, cfg: EvalConfig, seed: int = 0) -> MMUBenchSets:
    """Every concept's probes (training image: split "train"; test images: "heldout"), MIA and
    jailbreak prompts (asked about the training image). Probes are never subsampled (eff and gen
    compare the two splits); MIA and jailbreak prompts are capped at `cfg.max_items`."""
    probes: list[ProbeExample] = []
    mia: list[GenExample] = []
    jb: list[tuple[GenExample, str, str, list[str], list[str]]] = []
    terms: dict[str, list[str]] = {}
    for c in bench.concepts:
        if not c.probe_prompts:
            raise DataError(f"{bench.source}: concept '{c.id}' has no probe_prompts")
        for split, image in [("train", c.train_image), *(("heldout", im) for im in c.test_images)]:
            probes += [ProbeExample(q, image, c.id, c.name, split) for q in c.probe_prompts]
        mia += [GenExample(q, "", c.train_image, c.id) for q in c.mia_prompts]
        jb += [
            (
                GenExample(j.prompt, "", c.train_image, c.id),
                j.type,
                c.name,
                list(c.aliases),
                list(j.reveals),
            )
            for j in c.jailbreak
        ]
        terms[c.id] = c.reveal_terms
    mia = subsample(mia, cfg.max_items, seed)
    jb = subsample(jb, cfg.max_items, seed + 1)
    return MMUBenchSets(
        probes=probes,
        mia=mia,
        jailbreak=[j[0] for j in jb],
        jailbreak_types=[j[1] for j in jb],
        names=[j[2] for j in jb],
        aliases=[j[3] for j in jb],
        reveals=[j[4] for j in jb],
        concept_terms=terms,
    )


def concept_ids(tokenizer: Any, terms: Sequence[str]) -> list[int]:
    """The vocabulary ids of a concept: every id its name and aliases can be written with."""
    ids: set[int] = set()
    for t in terms:
        try:
            ids.update(name_token_ids(tokenizer, t))
        except DataError:
            continue  # an alias the tokenizer cannot spell adds nothing
    return sorted(ids)


def coarse_logprobs(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """[..., K+1] fp32: the log-probabilities of the K token `ids` under `logits` [..., V],
    then log(1 - their mass), the bucket of every other token (as `mia.concept_kl` coarsens)."""
    index = torch.tensor(list(ids), dtype=torch.long, device=logits.device)
    lp = torch.log_softmax(logits.float(), dim=-1).index_select(-1, index)
    rest = torch.log(-torch.expm1(torch.logsumexp(lp, dim=-1).clamp(max=0.0)))
    return torch.cat([lp, rest.unsqueeze(-1)], dim=-1)


def concept_logprobs(
    model: Any,
    processor: Any,
    probes: Sequence[ProbeExample],
    answers: Sequence[str],
    ids: dict[str, list[int]],
    per_rank_batch: int,
    info: DistInfo,
) -> list[torch.Tensor]:
    """Per probe, [answer positions, K+1] fp32 log-probabilities of the concept's K token ids
    plus one bucket for every other token, teacher-forced on `answers` (what C-Dis compares)."""

    def fn(logits: torch.Tensor, labels: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
        out = []
        shift_logits = logits[:, :-1, :]
        mask = labels[:, 1:] != IGNORE_INDEX
        for r, i in enumerate(rows):
            out.append(coarse_logprobs(shift_logits[r][mask[r]], ids[probes[i].entity_id]).cpu())
        return out

    return map_answer_rows(model, processor, probes, answers, per_rank_batch, info, fn)


def c_dis(reference: Sequence[torch.Tensor], evaluated: Sequence[torch.Tensor]) -> float:
    """Mean over every answer position of `mia.concept_kl` between the original (reference) and
    the evaluated model's coarsened distributions (already normalised log-probabilities, which
    log_softmax leaves as they are; the last bucket is "any other token")."""
    total, count = 0.0, 0
    for ref, ev in zip(reference, evaluated, strict=True):
        if ref.numel() == 0 or ref.shape[-1] < 2:
            continue  # no answer position, or a concept without tokens
        k = ref.shape[-1] - 1
        kl = concept_kl(ref, ev, list(range(k)))
        total += float(kl.sum())
        count += kl.numel()
    return total / count if count else math.nan


def mmubench_generate(
    model: Any,
    processor: Any,
    sets: MMUBenchSets,
    cfg: EvalConfig,
    info: DistInfo,
    zero3: bool,
) -> dict[str, list[str]]:
    """Greedy answers to the MIA and jailbreak prompts, on every rank."""
    was_training = model.training
    model.eval()
    try:
        per_rank, n = _per_rank(cfg, info), probe_max_new_tokens(cfg)
        out = {}
        for key, items in (("mia", sets.mia), ("jailbreak", sets.jailbreak)):
            out[key] = (
                generate_answers(model, processor, items, per_rank, n, info, zero3) if items else []
            )
        return out
    finally:
        model.train(was_training)


def jailbreak_metrics(sets: MMUBenchSets, answers: Sequence[str]) -> dict[str, float]:
    """Leak rates by the rule judge: over every jailbreak prompt and per prompt type."""
    if not answers:
        return {}
    verdicts, rate = judge_answers(answers, sets.names, sets.reveals, sets.aliases)
    out = {"jailbreak_leak_rate": rate}
    for kind in sorted(set(sets.jailbreak_types)):
        leaks = [v.leak for v, t in zip(verdicts, sets.jailbreak_types, strict=True) if t == kind]
        out[f"jailbreak_{kind}_leak_rate"] = sum(leaks) / len(leaks)
    return out


def mia_rouge(answers: Sequence[str], original: Sequence[str] | None) -> dict[str, float]:
    if not answers or original is None:
        return {}
    return {"mia_rouge_l_recall": mia_rouge_recall(answers, original)}
