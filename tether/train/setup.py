"""Building blocks of the RL loop that are plumbing, not algorithm: task, policy, optimiser,
rollout, scoring, recomputation, evaluation, KL terms and mismatch metrics."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tether.engine.base import Engine
from tether.rollout import Rollout, SamplingParams
from tether.tasks.base import Example, Task
from tether.train.config import EngineKind, LRSchedule, RolloutPrecision, TrainConfig

if TYPE_CHECKING:
    from tether.train.scoring import Scorer


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: Any
    engine: Engine


DEFAULT_TASK_OPTIONS = {"arithmetic": {"max_digits": 2, "ops": "+"}}
"""Task options used when ``task_options`` is not given (the default job must be learnable in minutes)."""


def build_task(cfg: TrainConfig) -> Task:
    if cfg.env is not None:  # multi-turn episodes: the environment is the task (tether.agent.task)
        from tether.agent.task import build_env_task

        task = build_env_task(cfg.env, cfg.agent.env_options)
        task.pool = cfg.agent.task_pool
        return task
    from tether.tasks.registry import get_task

    options = cfg.task_options if cfg.task_options is not None else DEFAULT_TASK_OPTIONS.get(cfg.task, {})
    # the first reward decides how a dataset is read (tether or TRL convention) and checks its answers
    task = get_task(cfg.task, reward=cfg.rewards[0][0] if cfg.rewards else None, skip_bad_rows=cfg.skip_bad_rows or None,
                    text_check=builtin_text_check(cfg.model), **options)
    return with_drafts(task, cfg)


def with_drafts(task: Task, cfg: TrainConfig) -> Task:
    """``task`` with weak-to-strong drafts in its training prompts (``cfg.drafts``), or ``task`` itself (also when it
    already carries drafts: a task passed in is wrapped once)."""
    if cfg.drafts is None:
        return task
    from tether.tasks.drafts import DraftedTask

    if isinstance(task, DraftedTask):
        return task
    return DraftedTask(task, cfg.drafts, template=cfg.draft_template, seed=cfg.seed)


def builtin_text_check(model: str):
    """The built-in model's tokenizer check (dataset rows it cannot encode are bad rows); None for
    other models (their tokenizers encode any valid text)."""
    if model != "tiny":
        return None
    from tether.models.tokenizer import CharTokenizer

    return CharTokenizer().check


def build_policy(cfg: TrainConfig, task: Task, progress=None, model=None, tokenizer=None) -> Policy:
    """Model, tokenizer and engine; ``progress`` (a ``Reporter``) shows the built-in model's warm start.
    ``model`` (a transformers model object, with its ``tokenizer``) replaces the one ``cfg.model`` names."""
    if model is not None:
        from tether.models.hf import hf_policy, wrap_tokenizer

        if cfg.engine is EngineKind.VLLM:
            raise ValueError("config field 'engine' vllm needs a model path or alias, not a model object (the vLLM "
                             "server loads the weights itself)")
        return Policy(*hf_policy(cfg, model, wrap_tokenizer(model, tokenizer, chat=cfg.chat_template)))
    policy = _build_policy(cfg, task, progress)
    if cfg.engine is EngineKind.VLLM:  # a vLLM server in its own environment replaces the torch engine
        from tether.engine.vllm_engine import VLLMOptions, build_vllm_engine

        options = VLLMOptions(dtype=cfg.vllm_dtype, sync_every=cfg.vllm_sync_every, seed=cfg.seed,
                              record_support=cfg.replay_truncation)
        policy.engine = build_vllm_engine(policy.model, policy.tokenizer, options,
                                          hf_model=None if cfg.model == "tiny" else cfg.model)
    return policy


def _build_policy(cfg: TrainConfig, task: Task, progress=None) -> Policy:
    from tether.models import builtin

    if cfg.model != "tiny":  # a Hugging Face folder, a .gguf file or an alias (tether.models.hf)
        from tether.models.hf import build_hf_policy

        return Policy(*build_hf_policy(cfg))
    model, tokenizer = builtin.warm_started_tiny(task, seed=cfg.seed, steps=cfg.warmstart_steps,
                                                 max_turns=cfg.agent.max_turns if cfg.agent else 8,
                                                 progress=progress)
    from tether.engine.torch_engine import TorchEngine

    model = model.to(cfg.device)  # the engines below copy it, so they live on the same device
    engine = TorchEngine(copy.deepcopy(model), eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    if cfg.rollout_precision is not RolloutPrecision.FP32:  # numerics mismatch on purpose (docs/async.md)
        from tether.engine.precision import PrecisionEngine, install_train_precision

        engine = PrecisionEngine(copy.deepcopy(model), precision=cfg.rollout_precision, unified=cfg.unified_precision,
                                 eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
        if cfg.unified_precision:
            install_train_precision(model, cfg.rollout_precision)
    return Policy(model=model, tokenizer=tokenizer, engine=engine)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def build_alp(cfg: TrainConfig, model: torch.nn.Module):
    """ALP's layerwise perturbation on the trainer's ``model`` (``cfg.alp``), or None. Call it after every copy of
    the model was made (engine, reference): only this model carries the hooks."""
    if cfg.perturb is None:
        return None
    from tether.models.perturb import LayerPerturbation, decoder_layers

    a = cfg.perturb
    alp = LayerPerturbation(len(decoder_layers(model)), std=a.std, learnable=a.learnable, start=a.start, end=a.end,
                            seed=cfg.seed)
    return alp.to(next(model.parameters()).device).attach(model)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, extra_groups: list[dict] | None = None):
    """AdamW over the model's trainable weights, plus ``extra_groups`` (ALP's scales, with their own learning
    rate), and the LR schedule over all of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params}, *(extra_groups or [])]
    # fused: one kernel per tensor instead of ~10 passes (8 ms -> 1.6 ms per step for the 1.8 M tiny model)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)
    total = cfg.steps * cfg.epochs * cfg.minibatches

    def factor(i: int) -> float:
        if cfg.warmup_steps and i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.lr_schedule is LRSchedule.COSINE:
            progress = (i - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def sample_examples(task: Task, cfg: TrainConfig, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(cfg.prompts_per_step)]


def sampling_params(cfg: TrainConfig) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)


def encode_prompts(policy: Policy, examples: list[Example], cfg: TrainConfig) -> tuple[list[list[int]], Tensor]:
    """Token ids of ``group_size`` copies of each example's prompt (chat messages through the chat template)
    and the group index of every row."""
    from tether.tasks.trl_data import encode_prompt  # chat messages for conversational rows

    prompts = [encode_prompt(policy.tokenizer, ex) for ex in examples for _ in range(cfg.group_size)]
    return prompts, torch.arange(len(examples)).repeat_interleave(cfg.group_size)


def generate(policy: Policy, examples: list[Example], cfg: TrainConfig, seed: int) -> Rollout:
    prompts, group_B = encode_prompts(policy, examples, cfg)
    return policy.engine.generate(prompts, sampling_params(cfg), seed=seed, group_B=group_B)


def completions(policy: Policy, rollout: Rollout) -> list[str]:
    return [policy.tokenizer.decode(ids) for ids in completion_ids(policy, rollout)]


def completion_ids(policy: Policy, rollout: Rollout) -> list[list[int]]:
    """Each row's completion token ids (a finishing EOS left out, as in ``completions``)."""
    out = []
    for i in range(rollout.batch_size):
        start = int(rollout.prompt_len_B[i])
        ids = rollout.tokens_BT[i, start:start + int(rollout.completion_len_B[i])].tolist()
        if ids and ids[-1] in policy.tokenizer.eos_ids and bool(rollout.finished_B[i]):
            ids = ids[:-1]
        out.append(ids)
    return out


def score_rollout(scorer: Scorer, policy: Policy, rollout: Rollout, examples: list[Example], cfg: TrainConfig,
                  step: int):
    """Every reward on a rollout's completions (row i answers ``examples[i // group_size]``): a ``Scored``."""
    ids = completion_ids(policy, rollout)
    texts = [policy.tokenizer.decode(x) for x in ids]
    return scorer.score_batch([examples[i // cfg.group_size] for i in range(len(texts))], texts, ids, step)


def reward_metrics(scorer: Scorer, scored) -> dict[str, float]:
    """Per reward k over the batch's samples: ``reward/<name>/mean`` and ``/std`` of its values where it
    succeeded (population std; left out when it failed on every sample), ``/failed`` its failed calls; and
    what the rewards logged with ``log_metric``."""
    out: dict[str, float] = {}
    for t, values in zip(scorer.terms, scored.values_K):
        ok = [v for v in values if not math.isnan(v)]
        if ok:
            mean = sum(ok) / len(ok)
            out[f"reward/{t.metric}/mean"] = mean
            out[f"reward/{t.metric}/std"] = math.sqrt(sum((v - mean) ** 2 for v in ok) / len(ok))
        out[f"reward/{t.metric}/failed"] = float(len(values) - len(ok))
    return {**out, **scored.metrics}


def failed_by_reward(scorer: Scorer, scored) -> dict[str, int]:
    return {t.ref.name: sum(math.isnan(v) for v in values) for t, values in zip(scorer.terms, scored.values_K)}


def token_logprobs(model: torch.nn.Module, rollout: Rollout, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    from tether.models.logprobs import token_logprobs as recompute

    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        return recompute(model, rollout, replay_truncation=cfg.replay_truncation)


def evaluate(policy: Policy, scorer: Scorer, cfg: TrainConfig) -> float:
    """Greedy accuracy on the task's held-out split (first ``eval_size`` problems); failed reward
    calls score 0 and are counted (``eval_reward_failed``)."""
    examples = scorer.task.eval_examples()[: cfg.eval_size]
    greedy = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=cfg.max_new_tokens)
    from tether.tasks.trl_data import encode_prompt

    prompts = [encode_prompt(policy.tokenizer, ex) for ex in examples]
    rollout = policy.engine.generate(prompts, greedy, seed=0)
    ids = completion_ids(policy, rollout)
    results = scorer.score_eval(examples, [policy.tokenizer.decode(x) for x in ids], ids)
    return sum(r.reward for r in results) / max(len(examples), 1)


def kl_reward(logp_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor, cfg: TrainConfig, coef: float | None = None
              ) -> Tensor:
    """The KL penalty in the reward, ``coef`` (None: ``cfg.kl.coef``; the PI-controlled value with kl_target)."""
    from tether.objectives.kl import kl_penalty_in_reward

    per_token = kl_penalty_in_reward(logp_BT, logp_ref_BT, mask_BT, coef=cfg.kl.coef if coef is None else coef,
                                     estimator=cfg.kl.estimator)
    return per_token.sum(-1).to(torch.float32)


def kl_loss_terms(logp_theta_BT: Tensor, logp_ref_BT: Tensor, mask_BT: Tensor, logp_mu_BT: Tensor | None,
                  cfg: TrainConfig, coef: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-token KL penalty in the loss (``coef``: None, ``cfg.kl.coef``) and its metrics (``kl/is_weight_mean``, the mean of ``pi_theta/mu``
    over loss tokens, with the importance-corrected estimator ``k3_is``)."""
    from tether.objectives.inputs import masked_mean
    from tether.objectives.kl import IMPORTANCE_CORRECTED, kl_penalty_in_loss

    kl_BT = kl_penalty_in_loss(logp_theta_BT, logp_ref_BT, mask_BT, estimator=cfg.kl.estimator,
                               coef=cfg.kl.coef if coef is None else coef,
                               logp_mu_BT=logp_mu_BT)
    metrics = {}
    if cfg.kl.estimator == IMPORTANCE_CORRECTED:
        metrics["kl/is_weight_mean"] = masked_mean(torch.exp(logp_theta_BT.detach() - logp_mu_BT), mask_BT)
    return kl_BT, metrics


def mismatch_metrics(logp_old_BT: Tensor | None, rollout: Rollout, entropy_BT: Tensor | None, step: int, *,
                     behave_BT: Tensor | None = None) -> dict[str, Any]:
    """The meter on pi_old vs mu (plus versions), as plain floats for metrics.jsonl.

    ``behave_BT``: pi_old at each token's own behaviour version (old_logits=snapshot), which separates the
    engine and staleness parts exactly. ``logp_old_BT`` None (old_logits=loglinear): versions only."""
    from tether.meter.measure import measure, to_floats

    mask = rollout.loss_mask_BT
    stats = measure(mask_BT=mask, logp_old_BT=logp_old_BT, logp_mu_BT=rollout.logp_mu_BT, logp_behave_old_BT=behave_BT,
                    entropy_BT=entropy_BT, version_BT=rollout.version_BT, current_version=step,
                    profiles=("total",) if logp_old_BT is not None else False)
    if logp_old_BT is not None:
        diff = (logp_old_BT - rollout.logp_mu_BT).abs()
        stats["mismatch/abs_logp_diff_mean"] = (diff * mask).sum() / mask.sum().clamp(min=1)
        stats["mismatch/abs_logp_diff_max"] = torch.where(mask, diff, 0).max() if mask.any() else torch.zeros(())
        stats["entropy/mean"] = (entropy_BT * mask).sum() / mask.sum().clamp(min=1)
    return to_floats(stats)
