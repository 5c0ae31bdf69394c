"""Generated, checkable tasks for the trained tiny DiffusionGemma: prompt -> one right answer.

Each example is ``<bos>{task}: {payload}\n`` followed by the answer and ``<eos>``. Every payload and every answer
is 55 characters (56 tokens with ``<eos>``: nearly two canvases of the tiny checkpoint, C = 32), laid out so that
each answer character sits at the same distance after the payload characters it comes from. That layout is what a
model of a couple of million parameters learns in minutes; variable-length copies need position arithmetic it
would take hours to learn.

- ``copy``: fourteen three-letter words as given (``copy: cab fed ...`` -> ``cab fed ...``);
- ``reverse``: each word backwards (``cab`` -> ``bac``);
- ``sort``: fourteen groups of three digits, each in ascending order (``sort: 381 907 ...`` -> ``138 079 ...``);
- ``add``: eight sums of two digits, the ``??`` filled in (``add: 7+8=?? 3+4=?? ...`` -> ``7+8=15 3+4=07 ...``).

The tokenizer (``tiny_checkpoint.build_tiny_tokenizer``) spells these prompts and answers character by character.
"""

from __future__ import annotations

import random
from typing import NamedTuple

TASKS = ("copy", "reverse", "sort", "add")
# how often make_example draws each task: the sums take longest to learn (each digit is a function of two others)
TASK_WEIGHTS = (1, 1, 1, 2)
TASKS_VERSION = 1  # bump when an example changes (then the trained checkpoint must be retrained: tiny_training.py)
# NOTE: no m, s or t: the tiny tokenizer merges "▁t", "th", "us", "mo" and "sy" (pieces of "the", "user", "model",
# "system", "thought"), and a merged pair would shift an answer against its payload.
LETTERS = "abcdefghijklnopqruvwxyz"
DIGITS = "0123456789"
WORDS, WORD_LEN = 14, 3  # copy / reverse / sort: 14 groups of 3 + 13 spaces = 55 characters
SUMS = 8  # add: 8 x "a+b=??" + 7 spaces = 55 characters


class Example(NamedTuple):
    task: str
    prompt: str  # after <bos>, ending with "\n"
    answer: str  # before <eos>


def make_example(rng: random.Random, task: str | None = None) -> Example:
    """One example; ``task`` None draws one of TASKS (by TASK_WEIGHTS)."""
    task = rng.choices(TASKS, TASK_WEIGHTS)[0] if task is None else task
    if task == "add":
        pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(SUMS)]
        payload = " ".join(f"{a}+{b}=??" for a, b in pairs)
    else:
        symbols = DIGITS if task == "sort" else LETTERS
        payload = " ".join("".join(rng.choice(symbols) for _ in range(WORD_LEN)) for _ in range(WORDS))
    return Example(task, f"{task}: {payload}\n", solve(task, payload))


def solve(task: str, payload: str) -> str:
    words = payload.split(" ")
    if task == "copy":
        return payload
    if task == "reverse":
        return " ".join(w[::-1] for w in words)
    if task == "sort":
        return " ".join("".join(sorted(w)) for w in words)
    if task == "add":
        return " ".join(f"{w[:4]}{int(w[0]) + int(w[2]):02d}" for w in words)
    raise ValueError(f"unknown task {task!r}")


def eval_examples(n: int, seed: int = 1234) -> list[Example]:
    """``n`` examples, the tasks in turn, from their own seed (the training stream uses the recipe's seed)."""
    rng = random.Random(seed)
    return [make_example(rng, TASKS[i % len(TASKS)]) for i in range(n)]


def score(example: Example, generated: str) -> bool:
    """Right iff the generated text (special tokens skipped), up to the end of its first line, is the answer."""
    return generated.split("\n")[0].strip() == example.answer


def score_ids(tokenizer, example: Example, ids) -> bool:
    """``score`` of generated token ids (``<eos>`` and the like are not text)."""
    return score(example, tokenizer.decode(ids, skip_special_tokens=True))


def prompt_ids(tokenizer, example: Example, bos_token_id: int = 2) -> list[int]:
    """``<bos>`` + the prompt's tokens (the tiny tokenizer adds no BOS of its own)."""
    return [bos_token_id, *tokenizer(example.prompt, add_special_tokens=False)["input_ids"]]
