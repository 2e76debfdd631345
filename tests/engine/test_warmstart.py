import json
import random

import pytest
import torch

from tether.engine.torch_engine import TorchEngine
from tether.models.builtin import tiny_model
from tether.models.tiny import TinyConfig
from tether.models.warmstart import cache_key, cache_root, warm_start
from tether.rollout import SamplingParams
from tether.tasks.base import Example

pytestmark = pytest.mark.engine


class ReverseTask:
    """Reverse a 1-3 letter word: small enough to learn in a hundred SFT steps."""

    name = "reverse-test"

    def __init__(self, letters: str = "abcd") -> None:
        self.letters = letters
        self.config = {"letters": letters}

    def sample(self, rng: random.Random) -> Example:
        word = "".join(rng.choice(self.letters) for _ in range(rng.randint(1, 3)))
        return Example(prompt=f"{word}>", answer=word[::-1], solution=word[::-1])

    def eval_examples(self) -> list[Example]:
        rng = random.Random(12345)
        return [self.sample(rng) for _ in range(40)]

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return float(completion.strip() == answer)


CFG = TinyConfig(vocab_size=99, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=32)


def accuracy(model, tokenizer, task) -> float:
    engine = TorchEngine(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    examples = task.eval_examples()
    r = engine.generate([tokenizer.encode(ex.prompt) for ex in examples], SamplingParams(top_k=1, max_new_tokens=5),
                        seed=0)
    total = 0.0
    for i, ex in enumerate(examples):
        p, c = int(r.prompt_len_B[i]), int(r.completion_len_B[i])
        total += task.reward(ex.prompt, tokenizer.decode(r.tokens_BT[i, p:p + c].tolist()), ex.answer)
    return total / len(examples)


def test_warm_start_learns_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    task = ReverseTask()
    model, tok = tiny_model(0, CFG)
    before = accuracy(model, tok, task)
    info = warm_start(model, tok, task, steps=120, seed=0, batch_size=32, lr=1e-2)
    assert not info.from_cache and info.cache_path.parent == tmp_path / "warmstart" == cache_root()
    assert info.cache_path.exists()
    assert sum(info.losses[-10:]) / 10 < 0.5 * sum(info.losses[:10]) / 10
    after = accuracy(model, tok, task)
    assert after > before and after >= 0.5

    again, _ = tiny_model(0, CFG)
    info2 = warm_start(again, tok, task, steps=120, seed=0, batch_size=32, lr=1e-2)
    assert info2.from_cache and info2.cache_path == info.cache_path and info2.losses == []
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "warmstart").glob(".tmp-*"))  # atomic write leaves no temp file

    other, _ = tiny_model(0, CFG)
    info3 = warm_start(other, tok, task, steps=120, seed=1, batch_size=32, lr=1e-2, cache_dir=tmp_path / "x")
    assert not info3.from_cache and info3.cache_path.parent == tmp_path / "x"
    assert info3.cache_path.name != info.cache_path.name
    different_task, _ = tiny_model(0, CFG)
    info4 = warm_start(different_task, tok, ReverseTask("xyz"), steps=0, seed=0)
    assert info4.cache_path.name != info.cache_path.name


def test_a_dataset_is_keyed_by_its_rows_not_its_path(tmp_path):
    """The same rows at two paths share one warm start; an edited row, or another in-memory dataset,
    gets its own (by path, an edited file loaded a stale warm start and two in-memory datasets, both
    named 'dataset', shared one entry)."""
    from tether.tasks.jsonl import JsonlTask
    from tether.tasks.trl_data import TRLDatasetTask

    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(40)]

    def jsonl(name, data):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        return JsonlTask(str(path))

    model, tok = tiny_model(0, CFG)

    def key(task):
        return cache_key(model, tok, task, steps=5, seed=0, hparams={})

    a, b = jsonl("a/data.jsonl", rows), jsonl("b/other.jsonl", rows)
    assert key(a) == key(b)
    trained = a.train_examples()[0].prompt  # a row of the training split (the rest may be held out)
    edited = [{**r, "answer": "0"} if r["prompt"] == trained else r for r in rows]
    assert key(jsonl("a/edited.jsonl", edited)) != key(a)
    mem1, mem2 = TRLDatasetTask(rows), TRLDatasetTask(rows[:-1])
    assert mem1.name == mem2.name == "dataset" and key(mem1) != key(mem2)
    assert key(TRLDatasetTask(list(rows))) == key(mem1)
