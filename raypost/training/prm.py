"""A process reward model: the student's architecture with a token-classification head, trained
with cross-entropy on the last token of every reasoning step (label: the step is right), as arXiv
2412.08393 trains its PRM on Monte-Carlo step labels. TRL 1.16 has no PRM trainer, so this is a
plain transformers `Trainer` built like the TRL ones (model given as a path, data in TRL's
stepwise-supervision format: `prompt`, `completions`, `labels`), and it runs on Ray Train through
the same worker loop, checkpoints and export as every other method.

A path's steps are concatenated exactly as given (each step carries its own separator), each
tokenized on its own after the rendered prompt; scoring (`step_scores`) reads the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainingArguments

IGNORE = -100


@dataclass
class PRMConfig(TrainingArguments):
    max_length: int = field(default=1024, metadata={"help": "tokens per path; later steps are cut"})
    model_init_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "from_pretrained kwargs"})


def prompt_text(tokenizer, prompt) -> str:
    """The prompt as the model sees it, the assistant turn opened (a chat) or as given (text)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def step_tokens(tokenizer, prompt, steps: list[str], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and its steps, and the position of each step's last token (the
    steps that fit in `max_length`)."""
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        piece = tokenizer(step, add_special_tokens=False)["input_ids"]
        if not piece or len(ids) + len(piece) > max_length:
            break
        ids = ids + piece
        ends.append(len(ids) - 1)
    return ids[:max_length], ends


def encode(tokenizer, row: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    ids, ends = step_tokens(tokenizer, row["prompt"], row["completions"], max_length)
    labels = [IGNORE] * len(ids)
    for end, label in zip(ends, row["labels"]):
        labels[end] = int(bool(label))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class PRMTrainer(Trainer):
    def __init__(self, model: str, args: PRMConfig, train_dataset, callbacks=None, peft_config=None):
        from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

        if peft_config is not None:
            raise ValueError("prm: LoRA is not supported")
        tokenizer = AutoTokenizer.from_pretrained(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        network = AutoModelForTokenClassification.from_pretrained(
            model, num_labels=2, id2label={0: "wrong", 1: "right"}, label2id={"wrong": 0, "right": 1},
            **(args.model_init_kwargs or {}))
        network.config.pad_token_id = tokenizer.pad_token_id
        encoded = train_dataset.map(lambda row: encode(tokenizer, row, args.max_length),
                                    remove_columns=train_dataset.column_names)
        super().__init__(model=network, args=args, train_dataset=encoded, processing_class=tokenizer,
                         data_collator=DataCollatorForTokenClassification(tokenizer), callbacks=callbacks)


def step_scores(model_dir: str, paths: list[tuple[Any, list[str]]], max_length: int = 1024,
                batch_size: int = 16) -> list[list[float]]:
    """P(right) at the end of each step of each (prompt, steps) path; steps cut by `max_length`
    get no score (the list is shorter)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = [step_tokens(tokenizer, prompt, steps, max_length) for prompt, steps in paths]
    out: list[list[float]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        with torch.inference_mode():
            probabilities = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., 1]
        out.extend([float(probabilities[row, end]) for end in ends] for row, (_, ends) in enumerate(batch))
    return out
