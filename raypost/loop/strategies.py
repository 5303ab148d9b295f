"""Selection strategies: score each seed from the current student's state, then pick.

Higher score = the student is weaker or less sure there, so the teacher's budget goes there first.
Strategies follow "Towards Active Synthetic Data Generation for Finetuning Language Models"
(arXiv 2512.00884), where the student's loss on its *own* greedy answer (`loss_self`, an
uncertainty proxy) was the best criterion and beat the loss of the gold answer (`loss_gold`).
One registry; the controller never branches on the strategy's name except for `static`, which is
a schedule (the whole budget before any training), not a score.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

from raypost.engines.base import Completion, entropy_from_top_logprobs


@dataclass
class Scored:
    """One seed as the student saw it this round."""

    id: str
    group: str | None
    completion: Completion
    correct: bool | None = None
    gold_loss: tuple[float, float] | None = None   # (mean, sum) token loss of the gold answer


def _token_losses(completion: Completion) -> list[float]:
    return [-t.logprob for t in completion.logprobs or []]


def loss_self(item: Scored, reduce: str, rng: random.Random) -> float:
    losses = _token_losses(item.completion)
    if not losses:
        return 0.0
    return sum(losses) / len(losses) if reduce == "mean" else sum(losses)


def loss_gold(item: Scored, reduce: str, rng: random.Random) -> float:
    mean, total = item.gold_loss
    return mean if reduce == "mean" else total


def first_token_entropy(item: Scored, reduce: str, rng: random.Random) -> float:
    if item.completion.first_token_entropy is not None:
        return item.completion.first_token_entropy
    first = (item.completion.logprobs or [None])[0]
    return entropy_from_top_logprobs([lp for _, lp in first.top]) if first else 0.0


def max_cot_entropy(item: Scored, reduce: str, rng: random.Random) -> float:
    """The most uncertain step of the student's own chain of thought (top-k estimate)."""
    return max((entropy_from_top_logprobs([lp for _, lp in t.top]) for t in item.completion.logprobs or [] if t.top),
               default=0.0)


def margin(item: Scored, reduce: str, rng: random.Random) -> float:
    """Minus the mean gap between the top-2 tokens: a small gap is an unsure student."""
    gaps = [t.top[0][1] - t.top[1][1] for t in item.completion.logprobs or [] if len(t.top) >= 2]
    return -sum(gaps) / len(gaps) if gaps else 0.0


def random_score(item: Scored, reduce: str, rng: random.Random) -> float:
    return rng.random()


SCORERS: dict[str, Callable[[Scored, str, random.Random], float]] = {
    "loss_self": loss_self,
    "loss_gold": loss_gold,
    "first_token_entropy": first_token_entropy,
    "max_cot_entropy": max_cot_entropy,
    "margin": margin,
    "random": random_score,
    "static": random_score,   # the static baseline draws its seeds at random, all before training
}


def score_items(items: list[Scored], strategy: str, reduce: str, seed: int) -> list[float]:
    rng = random.Random(seed)
    scorer = SCORERS[strategy]
    return [float(scorer(item, reduce, rng)) for item in items]


def rank(items: list[Scored], scores: list[float], *, skip_solved: bool = False, quota_by_group: bool = False,
         proportional: bool = False, seed: int = 0) -> list[int]:
    """Indices of `items` in the order the teacher should see them (best first).

    `skip_solved`: seeds the student already answers correctly go last (used only if the budget
    outlasts every other seed). `quota_by_group`: groups take turns, each in its own score order,
    so every group gets an even share of any prefix. `proportional`: a draw without replacement
    with probability proportional to score (shifted to be positive) instead of the top-m.
    """
    rng = random.Random(seed)
    order = list(range(len(items)))
    if proportional:
        low = min(scores, default=0.0)
        weights = {i: scores[i] - low + 1e-6 for i in order}
        # Efraimidis-Spirakis: key u^(1/w), largest first, is a weighted draw without replacement
        keys = {i: math.log(rng.random() or 1e-300) / weights[i] for i in order}
        order.sort(key=lambda i: keys[i], reverse=True)
    else:
        order.sort(key=lambda i: (-scores[i], items[i].id))
    if skip_solved:
        order = [i for i in order if items[i].correct is not True] + [i for i in order if items[i].correct is True]
    if quota_by_group:
        queues: dict[Any, list[int]] = {}
        for i in order:
            queues.setdefault(items[i].group, []).append(i)
        groups = sorted(queues, key=str)
        interleaved = []
        while any(queues.values()):
            for group in groups:
                if queues[group]:
                    interleaved.append(queues[group].pop(0))
        order = interleaved
    return order
