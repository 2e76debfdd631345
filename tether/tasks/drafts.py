"""Weak-to-strong elicitation with injected drafts (methods.md (a)10, INFERRED from the abstract).

During training every prompt carries a drafter's solution attempt; at evaluation time it does not. The draft sits in
the prompt, so it is context only: the rollout's loss mask covers the policy's own tokens (``Rollout.loss_mask_BT``,
built from positions or provenance), never the prompt, and no importance weight is applied to it. Four variants:

* ``matched-correct``: the problem's own reference solution (its answer when it has none);
* ``matched-wrong``: a wrong answer to the problem itself;
* ``mismatched-correct``: the correct solution of another training problem;
* ``mismatched-wrong``: a wrong answer to another training problem (the paper's best variant).

Reading (INFERRED): the drafter is not a model here: "correct" is the task's reference solution and "wrong" is the
answer deterministically perturbed (``wrong_answer``), so the four variants differ only in what the draft says.
Every choice is seeded per example (the run's seed and the problem's prompt), so the problems a run trains on are the
same for all four variants: only the drafts differ.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from typing import Any

from tether.tasks.base import Example, Task

VARIANTS = ("matched-correct", "matched-wrong", "mismatched-correct", "mismatched-wrong")
DEFAULT_TEMPLATE = "Draft: {draft}\n{prompt}"
MAX_TRIES = 64
"""Draws from the task's training distribution to find another problem for a mismatched draft."""


def check_template(template: str) -> str | None:
    """None if ``template`` formats with exactly the fields ``{draft}`` and ``{prompt}``; else the problem."""
    try:
        template.format(draft="", prompt="")
    except (KeyError, IndexError, ValueError) as e:
        return f"must use only the fields {{draft}} and {{prompt}} ({type(e).__name__}: {e})"
    if "{draft}" not in template or "{prompt}" not in template:
        return "must contain both {draft} and {prompt}"
    return None


def example_seed(seed: int, prompt: str) -> int:
    """A 64-bit seed of one example: sha256 of the run seed and the prompt (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "little")


def wrong_answer(answer: str, seed: int) -> str:
    """A deterministic answer different from ``answer``: an integer moved by a nonzero offset in [-9, 9], a decimal
    number by a nonzero offset scaled to its last digit, any other text with its characters rotated (or ``x``
    appended when rotating leaves it unchanged). Seeded by ``seed``; never equal to ``answer``."""
    rng = random.Random(seed)
    offset = rng.choice([d for d in range(-9, 10) if d != 0])
    text = answer.strip()
    try:
        return str(int(text) + offset)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and "." in text:
        places = len(text.rsplit(".", 1)[1])
        return f"{value + offset * 10 ** -places:.{places}f}"
    if len(text) > 1:
        k = rng.randrange(1, len(text))
        rotated = text[k:] + text[:k]
        if rotated != text:
            return rotated
    return text + "x"


def select_draft(variant: str, example: Example, other: Example | None, seed: int) -> str:
    """The draft text for ``example`` under ``variant``. ``other``: the other training problem a mismatched draft
    belongs to (unused, and may be None, when matched). Correct: the source problem's ``solution`` (its ``answer``
    without one); wrong: ``wrong_answer(answer, seed)``. Pure: the same inputs give the same draft."""
    if variant not in VARIANTS:
        raise ValueError(f"config field 'drafts' must be one of {', '.join(VARIANTS)}, got {variant!r}")
    matched, _, kind = variant.partition("-")
    source = example if matched == "matched" else other
    if source is None:
        raise ValueError("a mismatched draft needs another problem")
    if matched == "mismatched" and source.prompt == example.prompt:
        raise ValueError("a mismatched draft must come from another problem")
    if kind == "correct":
        return source.solution if source.solution is not None else source.answer
    return wrong_answer(source.answer, seed)


class DraftedTask:
    """A task whose training prompts carry a draft (``template`` with ``{draft}`` and ``{prompt}``) and whose
    evaluation examples are the plain ones. Everything else (reward, warm start, expert coverage) is the inner
    task's."""

    def __init__(self, task: Task, variant: str, *, template: str = DEFAULT_TEMPLATE, seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"config field 'drafts' must be one of {', '.join(VARIANTS)}, got {variant!r}")
        problem = check_template(template)
        if problem:
            raise ValueError(f"config field 'draft_template' {problem}, got {template!r}")
        self.inner, self.variant, self.template, self.seed = task, variant, template, seed

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, attr: str) -> Any:  # only reached for what this wrapper does not define
        return getattr(self.__dict__["inner"], attr)

    def other_problem(self, example: Example, seed: int) -> Example:
        """Another problem of the training distribution (a different prompt), drawn with its own ``seed`` so the
        main sampling stream is untouched."""
        rng = random.Random(seed)
        for _ in range(MAX_TRIES):
            other = self.inner.sample(rng)
            if other.prompt != example.prompt:
                return other
        raise ValueError(f"drafts {self.variant!r}: task {self.name!r} gave the same problem {MAX_TRIES} times; a "
                         "mismatched draft needs a task with more than one problem")

    def draft_for(self, example: Example) -> str:
        seed = example_seed(self.seed, example.prompt)
        other = self.other_problem(example, seed) if self.variant.startswith("mismatched") else None
        return select_draft(self.variant, example, other, seed)

    def augment(self, example: Example) -> Example:
        if getattr(example, "messages", None):
            raise ValueError(f"config field 'drafts' needs plain-text prompts; task {self.name!r} has chat messages")
        prompt = self.template.format(draft=self.draft_for(example), prompt=example.prompt)
        return replace(example, prompt=prompt)

    def sample(self, rng: random.Random) -> Example:
        return self.augment(self.inner.sample(rng))

    def eval_examples(self) -> list[Example]:
        return self.inner.eval_examples()

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return self.inner.reward(prompt, completion, answer)
