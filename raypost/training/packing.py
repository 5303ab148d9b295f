"""Packed SFT batches that keep each packed row a row of its own.

TRL's best-fit-decreasing packing is padding-free: it flattens a whole batch into one sequence
and relies on FlashAttention's varlen kernels to keep documents apart. Without FlashAttention
(on CPUs, or SDPA on GPUs) transformers builds a block-diagonal mask over that one sequence, so
attention costs (batch x max_length)^2 and its saved weights dominate memory. Kept as rows, each
packed row of `max_length` tokens gets its own block-diagonal mask (from `position_ids`, which
restart at every document): the same documents, the same loss, (max_length)^2 per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FLASH_ATTENTION_PREFIX = "flash"


def needs_row_packing(trainer) -> bool:
    """True when TRL's SFTTrainer would flatten packed rows for an attention without varlen kernels."""
    implementation = trainer.model.config._attn_implementation or ""
    return trainer.padding_free and not implementation.startswith(FLASH_ATTENTION_PREFIX)


class RowPackedCollator:
    """Wraps TRL's language-modeling collator: rows padded, per-document position_ids, no
    attention_mask (transformers then masks each row block-diagonally by document).

    `tokens_seen` counts real tokens: TRL's `num_tokens` reads the width of `position_ids` when
    there is no attention mask, which is one row's length, not the batch's."""

    def __init__(self, collator):
        self.collator = dataclasses.replace(collator, padding_free=False, return_position_ids=True)
        self.tokens_seen = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        real = batch.pop("attention_mask")
        self.tokens_seen += int(real.sum())
        # a document's first token is no target for the previous document's last token
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def use_row_packing(trainer) -> RowPackedCollator | None:
    """Swap the SFT trainer's collator for row packing where it is needed; the new collator, or None."""
    if not needs_row_packing(trainer):
        return None
    collator = RowPackedCollator(trainer.data_collator)
    trainer.data_collator = collator
    return collator
