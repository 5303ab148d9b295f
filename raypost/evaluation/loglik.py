"""Multiple-choice scoring by log-likelihood (MMLU as in Hendrycks et al. 2021): one forward
pass per question over the prompt ending in "Answer:", then the highest next-token logprob
among " A", " B", " C", " D" is the model's choice. Transformers only: it needs logits over
the vocabulary at the prompt's last position, which generation engines do not expose.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from raypost.engines.base import row_error
from raypost.evaluation.loaders import LETTERS


def letter_token_ids(tokenizer) -> list[int]:
    ids = []
    for letter in LETTERS:
        tokens = tokenizer.encode(f" {letter}", add_special_tokens=False)
        # " A" is one token in BPE vocabularies; where it splits, the letter is the last piece
        ids.append(tokens[-1])
    if len(set(ids)) != len(ids):
        raise ValueError("the tokenizer maps the answer letters A-D to the same token")
    return ids


class LoglikScorer:
    """Ray Data actor: rows with `id` and `text` in, `id`, `response` (the letter) and
    `letter_logprobs` (JSON) out."""

    def __init__(self, model_path: str, dtype: str = "auto"):
        from raypost.config import EngineConfig
        from raypost.engines.transformers_engine import TransformersEngine

        self.engine = TransformersEngine(model_path, EngineConfig(backend="transformers", dtype=dtype))
        self.letter_ids = letter_token_ids(self.engine.tokenizer)

    def score(self, text: str) -> tuple[str, list[float]]:
        log_probs = self.engine.next_token_logprobs(text, self.letter_ids)
        return LETTERS[int(np.argmax(log_probs))], log_probs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        ids, responses, logprobs, errors = [], [], [], []
        for row_id, text in zip(batch["id"], batch["text"]):
            ids.append(str(row_id))
            try:
                letter, values = self.score(str(text))
                responses.append(letter)
                logprobs.append(json.dumps(dict(zip(LETTERS, values))))
                errors.append(None)
            except Exception as error:  # one bad question is reported, not fatal
                responses.append(None)
                logprobs.append(None)
                errors.append(row_error(error))
        return {"id": ids, "response": responses, "letter_logprobs": logprobs, "error": errors}


def score_loglik(rows: list[dict[str, Any]], model_path: str, *, dtype: str = "auto", batch_size: int = 16,
                 concurrency: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0) -> list[dict[str, Any]]:
    """Rows {id, text} -> {id, response, letter_logprobs, error}, on Ray Data actors."""
    import ray

    from raypost.runtime import ensure_ray

    ensure_ray()
    dataset = ray.data.from_items([{"id": r["id"], "text": r["text"]} for r in rows])
    scored = dataset.map_batches(
        LoglikScorer,
        fn_constructor_kwargs=dict(model_path=model_path, dtype=dtype),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    return scored.take_all()
