"""Weak-to-strong drafts (issue 19 item 3): the pure draft selection against a slow reference, its determinism,
mismatched drafts never from the same problem, the wrapper's plain evaluation split and the edge checks."""

from __future__ import annotations

import random

import pytest

from tether.tasks.base import Example
from tether.tasks.drafts import (
    VARIANTS,
    DraftedTask,
    check_template,
    example_seed,
    select_draft,
    wrong_answer,
)
from tether.train.config import TrainConfig


class ListTask:
    """A task over a fixed list of problems (sampled uniformly), plain held-out split."""

    name = "list"

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def sample(self, rng: random.Random) -> Example:
        return rng.choice(self.examples)

    def eval_examples(self) -> list[Example]:
        return [Example(prompt="9+9=", answer="18")]

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return float(completion.strip() == answer)


PROBLEMS = [Example(prompt=f"{a}+{b}=", answer=str(a + b), solution=f"{a}+{b}={a + b}")
            for a in range(3) for b in range(3)]


def reference_draft(variant: str, example: Example, other: Example | None, seed: int) -> str:
    """The table of the four variants written out case by case."""
    if variant == "matched-correct":
        return example.solution if example.solution is not None else example.answer
    if variant == "matched-wrong":
        return wrong_answer(example.answer, seed)
    if variant == "mismatched-correct":
        return other.solution if other.solution is not None else other.answer
    if variant == "mismatched-wrong":
        return wrong_answer(other.answer, seed)
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_matches_the_reference(variant):
    for ex in PROBLEMS:
        for other in PROBLEMS:
            if other.prompt == ex.prompt:
                continue
            for seed in range(3):
                assert select_draft(variant, ex, other, seed) == reference_draft(variant, ex, other, seed)


def test_correct_without_a_solution_is_the_answer_and_wrong_is_never_the_answer():
    ex, other = Example(prompt="a", answer="12"), Example(prompt="b", answer="7")
    assert select_draft("matched-correct", ex, None, 0) == "12"
    assert select_draft("mismatched-correct", ex, other, 0) == "7"
    for answer in ["0", "-3", "12", "3.25", "abc", "a", "aa", "", "x y"]:
        for seed in range(50):
            w = wrong_answer(answer, seed)
            assert w != answer.strip() and w == wrong_answer(answer, seed)
    assert {wrong_answer("5", s) for s in range(200)} <= {str(5 + d) for d in range(-9, 10) if d}
    assert len({wrong_answer("5", s) for s in range(200)}) > 1  # the seed picks the offset


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_wrapper_is_deterministic_and_mismatched_never_picks_the_same_problem(variant):
    task = DraftedTask(ListTask(PROBLEMS), variant, template="D:{draft}|{prompt}", seed=3)
    rng_a, rng_b = random.Random(7), random.Random(7)
    a = [task.sample(rng_a) for _ in range(40)]
    b = [task.sample(rng_b) for _ in range(40)]
    assert [x.prompt for x in a] == [x.prompt for x in b]  # same seed, same drafts
    rng_plain = random.Random(7)
    inner = [ListTask(PROBLEMS).sample(rng_plain) for _ in range(40)]
    by_prompt = {p.prompt: p for p in PROBLEMS}
    for aug, ex in zip(a, inner):  # the same problems as the plain task: only the draft is added
        draft, _, prompt = aug.prompt[2:].partition("|")
        assert prompt == ex.prompt and aug.answer == ex.answer
        seed = example_seed(3, ex.prompt)
        if variant.startswith("mismatched"):
            other = task.other_problem(ex, seed)
            assert other.prompt != ex.prompt
            assert draft == reference_draft(variant, ex, other, seed)
            if variant == "mismatched-correct":
                assert draft == other.solution != ex.solution
        else:
            assert draft == reference_draft(variant, by_prompt[ex.prompt], None, seed)
    assert task.eval_examples() == [Example(prompt="9+9=", answer="18")]  # no draft at evaluation time
    assert task.reward("x", "3", "3") == 1.0 and task.name == "list"


def test_a_task_with_one_problem_cannot_give_a_mismatched_draft():
    task = DraftedTask(ListTask(PROBLEMS[:1]), "mismatched-wrong")
    with pytest.raises(ValueError, match="more than one problem"):
        task.sample(random.Random(0))
    with pytest.raises(ValueError, match="another problem"):
        select_draft("mismatched-correct", PROBLEMS[0], PROBLEMS[0], 0)


@pytest.mark.parametrize("flat, field", [
    (dict(drafts="mismatched"), "'drafts'"),
    (dict(drafts="matched-correct", draft_template="{prompt}"), "'draft_template'"),
    (dict(drafts="matched-correct", draft_template="{draft}{prompt}{x}"), "'draft_template'"),
    (dict(drafts="matched-correct", env="frozenlake"), "'drafts'"),
])
def test_bad_draft_settings_name_the_field(flat, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_flat(**flat)


def test_template_check():
    assert check_template("Draft: {draft}\n{prompt}") is None
    assert "both" in check_template("{draft}")
    assert check_template("{draft}{prompt}{0}") is not None


def test_the_trainer_wraps_a_given_task_once():
    from tether.train.setup import with_drafts

    cfg = TrainConfig.from_flat(drafts="matched-wrong", draft_template="{draft}|{prompt}", seed=5)
    inner = ListTask(PROBLEMS)
    task = with_drafts(inner, cfg)
    assert isinstance(task, DraftedTask) and task.seed == 5 and task.template == "{draft}|{prompt}"
    assert with_drafts(task, cfg) is task
    assert with_drafts(inner, TrainConfig.from_flat()) is inner  # --drafts off: the task itself
