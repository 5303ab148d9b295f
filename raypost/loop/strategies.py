"""Selection strategies: score each seed from the current student's state, then pick.

Higher score = the student is weaker or less sure there, so the teacher's budget goes there first.
Strategies follow "Towards Active Synthetic Data Generation for Finetuning Language Models"
(arXiv 2512.00884), where the student's loss on its *own* greedy answer (`loss_self`, an
uncertainty proxy) was the best criterion and beat the loss of the gold answer (`loss_gold`).
One registry; the controller never branches on the strategy's name except for `static`, which is
a schedule (the whole budget before any training), not a score. Two strategies need more than
the student's answer, and the controller gathers it first: `judge` (the teacher's 1-10 grade of
the student's answer, arXiv 2512.00884's LLM-as-judge) and `kcenter` (greedy k-center over
question embeddings, the coreset criterion: the seed farthest from everything taught so far).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from raypost.engines.base import Completion, entropy_from_top_logprobs


@dataclass
class Scored:
    """One seed as the student saw it this round: light fields only (the answer's logprobs stay
    on the workers that read them; `signal` is what the strategy computed there)."""

    id: str
    group: str | None
    completion: Completion | None
    correct: bool | None = None
    signal: float | None = None         # an ANSWER_SIGNALS strategy's value of the student's answer
    gold_loss: tuple[float, float] | None = None   # (mean, sum) token loss of the gold answer
    grade: float | None = None          # the judge's 1-10 rating of `completion` (None: not graded)
    learnable: bool = True              # the learnability filter's verdict


def loss_self(completion: Completion, reduce: str) -> float:
    losses = [-t.logprob for t in completion.logprobs or []]
    if not losses:
        return 0.0
    return sum(losses) / len(losses) if reduce == "mean" else sum(losses)


def first_token_entropy(completion: Completion, reduce: str) -> float:
    if completion.first_token_entropy is not None:
        return completion.first_token_entropy
    first = (completion.logprobs or [None])[0]
    return entropy_from_top_logprobs([lp for _, lp in first.top]) if first else 0.0


def max_cot_entropy(completion: Completion, reduce: str) -> float:
    """The most uncertain step of the student's own chain of thought (top-k estimate)."""
    return max((entropy_from_top_logprobs([lp for _, lp in t.top]) for t in completion.logprobs or [] if t.top),
               default=0.0)


def margin(completion: Completion, reduce: str) -> float:
    """Minus the mean gap between the top-2 tokens: a small gap is an unsure student."""
    gaps = [t.top[0][1] - t.top[1][1] for t in completion.logprobs or [] if len(t.top) >= 2]
    return -sum(gaps) / len(gaps) if gaps else 0.0


# Strategies whose score is a function of the student's own answer alone. They are computed where
# the answers are (answer_signals, a Ray Data map over the committed answer parts), so the
# logprobs never come to the driver; there only (id, correct, signal) arrive.
ANSWER_SIGNALS: dict[str, Callable[[Completion, str], float]] = {
    "loss_self": loss_self,
    "first_token_entropy": first_token_entropy,
    "max_cot_entropy": max_cot_entropy,
    "margin": margin,
}

SIGNALS_SCHEMA = pa.schema([("id", pa.string()), ("correct", pa.bool_()), ("signal", pa.float64()),
                            ("text", pa.string())])


def is_correct(text: str, gold: str | None) -> bool | None:
    """Whether an answer's final number is the gold answer's (None: no gold answer to check)."""
    from raypost.evaluation.scoring import score_gsm8k

    return None if gold is None else score_gsm8k(text, gold).correct


def answer_signals(table: pa.Table, *, strategy: str, reduce: str, keep_text: bool) -> pa.Table:
    """Generation rows (raypost.schema) in, one light row per answer out: whether it is right
    (against the row's reference), the strategy's signal where it is an ANSWER_SIGNALS one, and
    the text only where a later step needs it (the judge grades it)."""
    from raypost import schema
    from raypost.engines.base import TokenLogprob

    signal = ANSWER_SIGNALS.get(strategy)
    out = []
    for row in table.to_pylist():
        text = row[schema.RESPONSE] or ""
        reference = row.get(schema.REFERENCE)
        value = None
        if signal is not None:
            logprobs = row.get(schema.LOGPROBS)
            completion = Completion(
                text, row.get(schema.COMPLETION_TOKENS) or 0, row.get(schema.PROMPT_TOKENS) or 0,
                logprobs=None if logprobs is None else [TokenLogprob.from_record(t) for t in logprobs],
                first_token_entropy=row.get(schema.FIRST_TOKEN_ENTROPY))
            value = float(signal(completion, reduce))
        out.append({"id": row[schema.ID], "correct": is_correct(text, reference),
                    "signal": value, "text": text if keep_text else None})
    return pa.Table.from_pylist(out, schema=SIGNALS_SCHEMA)


def _signal(item: Scored, reduce: str, rng: random.Random) -> float:
    # an answer the student could not give has no signal: it ranks as a sure one would
    return 0.0 if item.signal is None else item.signal


def loss_gold(item: Scored, reduce: str, rng: random.Random) -> float:
    mean, total = item.gold_loss
    return mean if reduce == "mean" else total


def judge(item: Scored, reduce: str, rng: random.Random) -> float:
    """10 minus the teacher's grade: the worse the answer, the sooner its seed goes to the
    teacher. An answer the judge could not grade ranks after every graded one."""
    return -1.0 if item.grade is None else 10.0 - item.grade


def random_score(item: Scored, reduce: str, rng: random.Random) -> float:
    return rng.random()


def kcenter_order(vectors, centers: list[int]) -> list[int]:
    """Greedy k-center (Sener & Savarese's coreset): repeatedly the point farthest from every
    centre so far. `centers` are the seeds already taught; with none, the farthest from the
    mean starts. Returns every index, the first picked first."""
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if n == 0:
        return []
    if centers:
        distance = np.full(n, np.inf)
        for center in centers:   # one centre at a time: memory stays O(n x dim)
            distance = np.minimum(distance, np.linalg.norm(vectors - vectors[center], axis=1))
    else:
        distance = np.linalg.norm(vectors - vectors.mean(axis=0), axis=1)
    taken = np.zeros(n, dtype=bool)
    taken[list(centers)] = True
    order = []
    for _ in range(n - len(set(centers))):
        masked = np.where(taken, -np.inf, distance)
        pick = int(np.argmax(masked))
        order.append(pick)
        taken[pick] = True
        distance = np.minimum(distance, np.linalg.norm(vectors - vectors[pick], axis=1))
    return order + [i for i in dict.fromkeys(centers)]


def embed_questions(texts: list[str], embedder: str):
    """L2-normalized question embeddings: MiniLM (curation's diversity embedder) or TF-IDF."""
    import numpy as np

    if embedder == "minilm":
        from raypost.curation.diversity import MiniLMEmbedder

        model = MiniLMEmbedder()
        return np.concatenate([model.embed(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    return normalize(TfidfVectorizer().fit_transform(texts)).toarray().astype(np.float32)


SCORERS: dict[str, Callable[[Scored, str, random.Random], float]] = {
    **{name: _signal for name in ANSWER_SIGNALS},
    "loss_gold": loss_gold,
    "judge": judge,
    "random": random_score,
    "static": random_score,   # the static baseline draws its seeds at random, all before training
}


def score_items(items: list[Scored], strategy: str, reduce: str, seed: int, *, embeddings=None,
                taught: list[int] = ()) -> list[float]:
    """One score per item, higher = ask the teacher sooner. kcenter needs `embeddings` (one row per
    item) and the indices already `taught`; its score is its place in the greedy order, reversed."""
    if strategy == "kcenter":
        order = kcenter_order(embeddings, list(taught))
        scores = [0.0] * len(items)
        for position, index in enumerate(order):
            scores[index] = float(len(order) - position)
        return scores
    rng = random.Random(seed)
    scorer = SCORERS[strategy]
    return [float(scorer(item, reduce, rng)) for item in items]


def rank(items: list[Scored], scores: list[float], *, skip_solved: bool = False, quota_by_group: bool = False,
         proportional: bool = False, seed: int = 0) -> list[int]:
    """Indices of `items` in the order the teacher should see them (best first).

    `skip_solved`: seeds the student already answers correctly go last (used only if the budget
    outlasts every other seed); so do seeds the learnability filter found not `learnable`. `quota_by_group`: groups take turns, each in its own score order,
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
    order = [i for i in order if items[i].learnable] + [i for i in order if not items[i].learnable]
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
