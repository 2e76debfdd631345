"""Offline data for SFT and PEAR: completions stored with their behaviour log-probs.

One JSONL row per completion::

    {"prompt": "12+7=", "completion": "19", "completion_ids": [..], "logp_behaviour": [..], "answer": "19"}

``completion_ids`` are the token ids after the prompt (EOS included when the sampler stopped on it);
``logp_behaviour[i]`` is ``log pi_beta(completion_ids[i] | prompt, completion_ids[:i])`` under the
distribution the behaviour policy actually sampled from. PEAR needs ``logp_behaviour`` on every row;
plain SFT does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.rollout import Rollout

BEHAVIOUR_FIELD = "logp_behaviour"


@dataclass(frozen=True)
class Row:
    prompt_ids: list[int]
    completion_ids: list[int]
    logp_behaviour: list[float] | None
    answer: str | None = None


def rows_from_rollout(rollout: Rollout, tokenizer, answers: list[str] | None = None) -> list[dict]:
    """JSONL-ready rows of a rollout (prompt, completion text and ids, behaviour log-probs)."""
    rows = []
    for i in range(rollout.batch_size):
        p, n = int(rollout.prompt_len_B[i]), int(rollout.completion_len_B[i])
        ids = rollout.tokens_BT[i].tolist()
        rows.append({
            "prompt": tokenizer.decode(ids[:p]), "completion": tokenizer.decode(ids[p:p + n]),
            "prompt_ids": ids[:p], "completion_ids": ids[p:p + n],
            BEHAVIOUR_FIELD: rollout.logp_mu_BT[i, p:p + n].tolist(),
            **({"answer": answers[i]} if answers is not None else {}),
        })
    return rows


def write_rows(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def load_rows(path: str | Path, tokenizer, *, need_behaviour: bool) -> list[Row]:
    """Read and validate a behaviour dataset; errors name the file, the row (1-based line) and the field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} row {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e}") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ValueError(f"{where}: missing field 'prompt'")
        prompt_ids = obj.get("prompt_ids") or tokenizer.encode(obj["prompt"])
        if "completion_ids" in obj:
            completion_ids = list(obj["completion_ids"])
        elif "completion" in obj:
            completion_ids = tokenizer.encode(obj["completion"]) + [tokenizer.eos_id]
        else:
            raise ValueError(f"{where}: missing field 'completion' (or 'completion_ids')")
        if not completion_ids:
            raise ValueError(f"{where}: empty completion")
        logp = obj.get(BEHAVIOUR_FIELD)
        if need_behaviour:
            if logp is None:
                raise ValueError(f"{where}: missing field '{BEHAVIOUR_FIELD}' (the behaviour policy's log-prob of "
                                 "each completion token), which PEAR needs to form its importance weights")
            if not isinstance(logp, list) or len(logp) != len(completion_ids):
                n = len(logp) if isinstance(logp, list) else type(logp).__name__
                raise ValueError(f"{where}: field '{BEHAVIOUR_FIELD}' has {n} entries for {len(completion_ids)} "
                                 "completion tokens")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 0 for x in logp):
                raise ValueError(f"{where}: field '{BEHAVIOUR_FIELD}' must hold finite log-probabilities <= 0")
        rows.append(Row(list(prompt_ids), completion_ids, None if logp is None else [float(x) for x in logp],
                        obj.get("answer")))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def rows_to_rollout(rows: list[Row], pad_id: int) -> Rollout:
    """Right-padded record of stored rows (``logp_mu_BT`` = behaviour log-probs, 0 where absent)."""
    lens = [len(r.prompt_ids) + len(r.completion_ids) for r in rows]
    T = max(lens)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    logp_mu = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        p = len(r.prompt_ids)
        tokens[i, :lens[i]] = torch.tensor(r.prompt_ids + r.completion_ids)
        if r.logp_behaviour is not None:
            logp_mu[i, p:lens[i]] = torch.tensor(r.logp_behaviour)
    return Rollout(tokens_BT=tokens, prompt_len_B=torch.tensor([len(r.prompt_ids) for r in rows]),
                   completion_len_B=torch.tensor([len(r.completion_ids) for r in rows]), logp_mu_BT=logp_mu,
                   version_BT=torch.full((len(rows), T), -1, dtype=torch.long))
