"""Prompts for each benchmark, in two styles.

`chat`: shots become user/assistant turns and the instruction says how to answer; the engine
applies the model's chat template. `completion`: everything is one plain text the model
continues (base models without a chat template), with stop strings ending the answer.
"""

from __future__ import annotations

import re

from raypost.evaluation.loaders import LETTERS, EvalItem

Messages = list[dict[str, str]]

# Chain-of-thought exemplars of Wei et al. 2022 ("Chain-of-Thought Prompting Elicits Reasoning",
# Table 20): the standard GSM8K few-shot prompt. Not GSM8K items, so never an evaluated item.
GSM8K_COT_EXEMPLARS: list[tuple[str, str]] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

GSM8K_INSTRUCTION = "Solve the problem step by step. End with \"The answer is N.\" where N is the final number."


def gsm8k_shot_from_item(item: EvalItem) -> tuple[str, str]:
    """A GSM8K training item as an exemplar: calculator annotations dropped, `#### N` restated."""
    solution = re.sub(r"<<[^>]*>>", "", item.fields["solution"])
    body = solution.split("####")[0].strip()
    return item.fields["question"], f"{body}\nThe answer is {item.reference}."


def gsm8k_messages(item: EvalItem, shots: list[tuple[str, str]], style: str) -> Messages:
    if style == "completion":
        text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in shots) + f"Q: {item.fields['question']}\nA:"
        return [{"role": "user", "content": text}]
    messages: Messages = []
    for question, answer in shots:
        messages += [{"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\nQuestion: {question}"},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\nQuestion: {item.fields['question']}"})
    return messages


GSM8K_COMPLETION_STOP = ["\n\nQ:", "\nQ:"]


def testbed_messages(item: EvalItem, style: str) -> Messages:
    """The procedural testbed (raypost.tasks): zero-shot, the system prompt its training data uses."""
    from raypost.tasks.arith import SYSTEM_PROMPT

    if style == "completion":
        return [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\nQ: {item.fields['question']}\nA:"}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item.fields["question"]}]


# --- MBPP: the prompt of Austin et al. 2021 (MBPP README), shots = task ids 2, 3, 4 ---------

MBPP_SHOT_IDS = (2, 3, 4)


def mbpp_task_text(item: EvalItem) -> str:
    tests = "\n".join(item.fields["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {item.fields['text']} "
            f"Your code should pass these tests:\n\n{tests}\n")


def mbpp_messages(item: EvalItem, shots: list[EvalItem], style: str) -> Messages:
    if style == "completion":
        text = "".join(f"{mbpp_task_text(s)}[BEGIN]\n{s.reference.strip()}\n[DONE]\n" for s in shots)
        return [{"role": "user", "content": f"{text}{mbpp_task_text(item)}[BEGIN]\n"}]
    messages: Messages = []
    for shot in shots:
        messages += [{"role": "user", "content": mbpp_task_text(shot)},
                     {"role": "assistant", "content": f"[BEGIN]\n{shot.reference.strip()}\n[DONE]"}]
    suffix = "" if shots else "Write the code between [BEGIN] and [DONE].\n"
    messages.append({"role": "user", "content": mbpp_task_text(item) + suffix})
    return messages


MBPP_COMPLETION_STOP = ["[DONE]"]


# --- HumanEval ---------------------------------------------------------------------------

def humaneval_messages(item: EvalItem, style: str) -> Messages:
    prompt = item.fields["prompt"]
    if style == "completion":
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": (
        "Complete the following Python function. Reply with the complete function in one "
        f"```python code block.\n\n```python\n{prompt}```")}]


# The stop strings of Chen et al. 2021 (Codex): a new top-level statement ends the function.
HUMANEVAL_COMPLETION_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


# --- MMLU: the prompt of Hendrycks et al. 2021 -------------------------------------------

def mmlu_question_text(item: EvalItem, with_answer: bool) -> str:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.fields["choices"]))
    answer = f" {item.reference}\n\n" if with_answer else ""
    return f"{item.fields['question']}\n{options}\nAnswer:{answer}"


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_completion_text(item: EvalItem, shots: list[EvalItem]) -> str:
    """The text whose next token is the answer letter (also the log-likelihood prompt)."""
    return mmlu_header(item.subject) + "".join(mmlu_question_text(s, True) for s in shots) + mmlu_question_text(item, False)


MMLU_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct option."


def mmlu_messages(item: EvalItem, shots: list[EvalItem], style: str) -> Messages:
    if style == "completion":
        return [{"role": "user", "content": mmlu_completion_text(item, shots)}]
    messages: Messages = []
    for i, shot in enumerate(shots):
        header = mmlu_header(item.subject) if i == 0 else ""
        messages += [{"role": "user", "content": f"{header}{mmlu_question_text(shot, False)}\n{MMLU_INSTRUCTION}"},
                     {"role": "assistant", "content": f"The answer is ({shot.reference})."}]
    header = "" if shots else mmlu_header(item.subject)
    messages.append({"role": "user", "content": f"{header}{mmlu_question_text(item, False)}\n{MMLU_INSTRUCTION}"})
    return messages


MMLU_COMPLETION_STOP = ["\n\n"]
