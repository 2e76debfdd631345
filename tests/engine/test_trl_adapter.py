"""The TRL adapter against TRL's own code: parity of loss and gradient with ``GRPOTrainer._compute_loss``
for each of TRL's loss types, and contract tests that fail loudly when the pinned TRL changes what the
adapter relies on (docs/adapters.md)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

trl = pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from tests.engine.trl_helpers import make_trainer  # noqa: E402
from tether.adapters.common import Objective  # noqa: E402
from tether.adapters.trl import FORWARD_ARGS, OPTIONAL_KEYS, PROVIDES, REQUIRED_KEYS, UNSUPPORTED  # noqa: E402

pytestmark = pytest.mark.engine

TOL = 1e-6
B, T, HORIZON = 6, 5, 6

PARITY = {
    # TRL loss_type: (TRL epsilon, TRL epsilon_high, tether preset, tether overrides) -- the convention mappings
    "grpo": (0.2, 0.2, "grpo", {}),
    "dapo": (0.2, 0.28, "dapo", {}),
    "dr_grpo": (0.2, 0.2, "dr_grpo", {}),
    "bnpo": (0.2, 0.2, "grpo", {"agg": "token-mean"}),
    # TRL's cispo cap is absolute (clamp(r, max=epsilon_high)) and has no lower bound
    "cispo": (0.2, 1.3, "cispo", {"eps_low": 1.0, "eps_high": 0.3}),
}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tr = make_trainer(tmp_path_factory.mktemp("trl"), max_completion_length=HORIZON)
    tr.model.train()
    return tr


def batch(seed: int, accumulation: int):
    """A micro-batch with ratios inside and outside every clip range, mixed-sign advantages, ragged
    lengths and one empty row (TRL's grpo counts it, tether's own trainer would not)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 0, 4, 1, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": torch.randn(B, generator=g, dtype=torch.float64),
        "old_per_token_logps": old,
        # a generation batch of `accumulation` micro-batches with this one's token count
        "num_items_in_batch": mask.sum() * accumulation,
    }
    return inputs, logp


def loss_and_grad(compute, trainer, inputs, logp, monkeypatch, entropy=None):
    entropy = torch.zeros_like(logp.detach()) if entropy is None else entropy
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", lambda *a, **k: (logp, entropy, None))
    loss = compute(trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def configure(trainer, monkeypatch, loss_type: str, accumulation: int):
    eps, eps_high, preset, overrides = PARITY[loss_type]
    monkeypatch.setattr(trainer, "loss_type", loss_type)
    monkeypatch.setattr(trainer, "epsilon_low", eps)
    monkeypatch.setattr(trainer, "epsilon_high", eps_high)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", accumulation, raising=False)
    monkeypatch.setattr(trainer.args, "steps_per_generation", accumulation)
    monkeypatch.setattr(trainer, "tether_objective",
                        Objective.resolve(preset, overrides, provides=PROVIDES, framework="TRL"))


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_type", list(PARITY))
def test_tether_preset_equals_trl_loss_and_gradient(trainer, monkeypatch, loss_type, accumulation):
    configure(trainer, monkeypatch, loss_type, accumulation)
    inputs, logp = batch(0, accumulation)
    trl_loss, trl_grad = loss_and_grad(lambda m, i: GRPOTrainer._compute_loss(trainer, m, i), trainer, inputs, logp,
                                       monkeypatch)
    ours, our_grad = loss_and_grad(trainer._compute_loss, trainer, inputs, logp, monkeypatch)
    assert trl_grad.abs().max() > 1e-3  # the batch moves the loss (a zero gradient would match anything)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL, rel=TOL)
    torch.testing.assert_close(our_grad, trl_grad, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_type", list(PARITY))
def test_kl_beta_equals_trl_loss_and_gradient(trainer, monkeypatch, loss_type, accumulation, bias_correction):
    """GRPOConfig ``beta``: TRL's k3 penalty to ``ref_per_token_logps`` (times ``pi_theta/pi_old`` with
    ``use_bias_correction_kl``), aggregated like each loss type, equals the adapter's KL term."""
    configure(trainer, monkeypatch, loss_type, accumulation)
    monkeypatch.setattr(trainer, "beta", 0.3)
    monkeypatch.setattr(trainer.args, "use_bias_correction_kl", bias_correction)
    inputs, logp = batch(3, accumulation)
    g = torch.Generator().manual_seed(4)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] + torch.randn(B, T, generator=g,
                                                                                dtype=torch.float64) * 0.7
    trl_loss, trl_grad = loss_and_grad(lambda m, i: GRPOTrainer._compute_loss(trainer, m, i), trainer, inputs, logp,
                                       monkeypatch)
    trainer._metrics["train"].clear()
    ours, our_grad = loss_and_grad(trainer._compute_loss, trainer, inputs, logp, monkeypatch)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL, rel=TOL)
    torch.testing.assert_close(our_grad, trl_grad, atol=TOL, rtol=TOL)
    # the KL moves the loss by far more than the tolerance (a dropped or mis-aggregated term would show)
    monkeypatch.setattr(trainer, "beta", 0.0)
    without, _ = loss_and_grad(trainer._compute_loss, trainer, inputs, logp, monkeypatch)
    assert abs(without.item() - trl_loss.item()) > 1e-3
    z = (logp.detach() - inputs["ref_per_token_logps"])
    k3 = torch.exp(-z) - 1 + z
    if bias_correction:
        k3 = k3 * torch.exp(logp.detach() - inputs["old_per_token_logps"])
    m = inputs["completion_mask"].bool()
    assert trainer._metrics["train"]["tether/kl/mean"][0] == pytest.approx(k3[m].mean().item(), rel=1e-9)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_type", list(PARITY))
def test_entropy_mask_equals_trl_loss_and_gradient(trainer, monkeypatch, loss_type, accumulation):
    """GRPOConfig ``top_entropy_quantile``: TRL's mask of high-entropy tokens on the policy loss (the KL and the
    normalisers keep every token) equals the adapter's zeroed advantages, with ``beta > 0`` as well."""
    configure(trainer, monkeypatch, loss_type, accumulation)
    monkeypatch.setattr(trainer, "top_entropy_quantile", 0.4)
    monkeypatch.setattr(trainer, "beta", 0.2)
    inputs, logp = batch(5, accumulation)
    g = torch.Generator().manual_seed(6)
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] + torch.randn(B, T, generator=g,
                                                                                dtype=torch.float64) * 0.5
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    trl_loss, trl_grad = loss_and_grad(lambda m, i: GRPOTrainer._compute_loss(trainer, m, i), trainer, inputs, logp,
                                       monkeypatch, entropy)
    ours, our_grad = loss_and_grad(trainer._compute_loss, trainer, inputs, logp, monkeypatch, entropy)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL, rel=TOL)
    torch.testing.assert_close(our_grad, trl_grad, atol=TOL, rtol=TOL)
    monkeypatch.setattr(trainer, "top_entropy_quantile", 1.0)  # the mask changes TRL's loss: the test can fail
    unmasked, _ = loss_and_grad(lambda m, i: GRPOTrainer._compute_loss(trainer, m, i), trainer, inputs, logp,
                                monkeypatch, entropy)
    assert abs(unmasked.item() - trl_loss.item()) > 1e-3


def test_parity_tolerance_sees_a_wrong_convention(trainer, monkeypatch):
    """The parity test can fail: tether's grpo with its own row count (non-empty rows only) is not TRL's
    grpo on a batch with an empty row, by far more than the tolerance."""
    configure(trainer, monkeypatch, "grpo", 1)
    inputs, logp = batch(0, 1)
    trl_loss, _ = loss_and_grad(lambda m, i: GRPOTrainer._compute_loss(trainer, m, i), trainer, inputs, logp,
                                monkeypatch)
    monkeypatch.setattr(trainer, "tether_counts", lambda inputs, rows: (None, None))
    ours, _ = loss_and_grad(trainer._compute_loss, trainer, inputs, logp, monkeypatch)
    assert abs(ours.item() - trl_loss.item()) > 100 * TOL
    assert ours.item() == pytest.approx(trl_loss.item() * B / (B - 1), rel=1e-9)


def test_tis_reads_vllm_logprobs_and_logs_the_meter(trainer, monkeypatch):
    """``sampling_per_token_logps`` is mu: TIS weights min(pi_old/mu, cap) enter the loss, and the meter's
    engine, staleness and decomposition appear under tether/ in TRL's metrics."""
    configure(trainer, monkeypatch, "grpo", 1)
    monkeypatch.setattr(trainer, "tether_objective", Objective.resolve(
        "tis", {"agg": "seq-mean-token-mean", "dual_clip_c": None}, provides=PROVIDES, framework="TRL"))
    inputs, logp = batch(1, 1)
    g = torch.Generator().manual_seed(2)
    mu = inputs["old_per_token_logps"] + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    mu[0, 1] = math.nan  # a token vLLM could not score: weight 1
    trainer._metrics["train"].clear()
    ours, our_grad = loss_and_grad(trainer._compute_loss, trainer, {**inputs, "sampling_per_token_logps": mu}, logp,
                                   monkeypatch)
    # TRL's grpo with the same truncated weights as its vLLM importance-sampling correction
    w = torch.exp(inputs["old_per_token_logps"] - mu).nan_to_num(nan=1.0).clamp(max=2.0)
    monkeypatch.setattr(trainer, "use_vllm", True)
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
    trl_loss, trl_grad = loss_and_grad(lambda m, i: GRPOTrainer._compute_loss(trainer, m, i), trainer,
                                       {**inputs, "importance_sampling_ratio": w}, logp, monkeypatch)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL, rel=TOL)
    torch.testing.assert_close(our_grad, trl_grad, atol=TOL, rtol=TOL)
    logged = trainer._metrics["train"]
    valid = inputs["completion_mask"].bool() & ~torch.isnan(mu)
    assert logged["tether/meter/engine/n_tokens"] == [float(inputs["completion_mask"].sum())]
    expected_k1 = (mu - inputs["old_per_token_logps"])[valid].sum().item() / inputs["completion_mask"].sum().item()
    assert logged["tether/meter/engine/kl_k1"][0] == pytest.approx(expected_k1, rel=1e-9)
    assert "tether/meter/decomp/engine/var_share" in logged
    assert logged["tether/tis/weight_max"][0] == pytest.approx(w[inputs["completion_mask"].bool()].max().item())


# ---- contract: what the adapter relies on in the pinned TRL ----

def test_compute_loss_signature_is_model_inputs():
    assert list(inspect.signature(GRPOTrainer._compute_loss).parameters) == ["self", "model", "inputs"]


def test_logprob_forward_takes_the_arguments_the_adapter_sets():
    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert params[:len(FORWARD_ARGS) + 1] == ["self", *FORWARD_ARGS]


def test_trl_produces_the_inputs_keys_the_adapter_reads():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    missing = [k for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if f'"{k}"' not in source]
    assert missing == [], f"TRL's _generate_and_score_completions no longer produces {missing}"


def test_trl_scales_the_loss_for_accumulation_itself():
    """The adapter's loss is already the micro-batch's share of the window: the Trainer must not divide again."""
    assert GRPOTrainer.loss_is_scaled_for_ga is True


def test_refused_settings_exist_with_the_accepted_defaults():
    defaults = GRPOConfig(output_dir="unused", report_to="none", use_cpu=True)
    for name, accepted, _ in UNSUPPORTED:
        assert getattr(defaults, name) == accepted, name
    # what the KL and the entropy mask rely on
    assert defaults.beta == 0.0 and defaults.top_entropy_quantile == 1.0 and defaults.use_bias_correction_kl is True
    params = list(inspect.signature(GRPOTrainer.get_high_entropy_mask).parameters)
    assert params == ["self", "entropies", "mask", "threshold"]


def test_entropy_mask_trains_and_is_refused_for_a_preset_it_does_not_fit(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, top_entropy_quantile=0.5)
    calls = []
    mask_fn = trainer.get_high_entropy_mask
    monkeypatch.setattr(trainer, "get_high_entropy_mask", lambda *a: calls.append(a[2]) or mask_fn(*a))
    trainer.train()
    assert calls == [0.5] and math.isfinite(trainer.state.log_history[0]["loss"])
    with pytest.raises(ValueError, match="top_entropy_quantile=0.5 .* objective 'sft'"):
        make_trainer(tmp_path, top_entropy_quantile=0.5, objective="sft")


def test_a_refused_setting_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="delta=2.0"):
        make_trainer(tmp_path, delta=2.0)


def test_presets_trl_cannot_feed_are_refused_by_name():
    with pytest.raises(ValueError, match="logp_teacher_BT, which TRL does not provide"):
        Objective.resolve("opd", None, provides=PROVIDES, framework="TRL")
    with pytest.raises(ValueError, match="has no hyper-parameter 'capp'"):
        Objective.resolve("tis", {"capp": 2.0}, provides=PROVIDES, framework="TRL")


def test_a_dump_nothing_feeds_is_an_error_when_training_begins(tmp_path):
    """``LogProbDump`` in ``callbacks=`` of TRL's own GRPOTrainer, without ``attach``, would write nothing:
    training refuses to start and says to call ``attach``."""
    from tether.adapters.trl_dump import LogProbDump

    trainer = make_trainer(tmp_path, stock=True, callbacks=[LogProbDump(tmp_path / "d.jsonl")])
    with pytest.raises(ValueError, match=r"LogProbDump\(path\).attach\(trainer\)"):
        trainer.train()
    assert not (tmp_path / "d.jsonl").exists()


def test_dump_columns_map_trl_inputs_like_the_trainer(tmp_path):
    """``dump_columns`` (the stock-trainer dump): mask = completion x tool mask, mu = vLLM's log-probs with NaN
    tokens taking the behaviour log-probs, the current ones when TRL skipped ``old_per_token_logps``; and
    ``attach`` on a ``TetherGRPOTrainer`` only registers the dump (that trainer feeds it itself)."""
    from tether.adapters.trl_dump import LogProbDump, dump_columns

    inputs, logp = batch(7, 1)
    tool = torch.ones_like(inputs["completion_mask"])
    tool[0, 1:3] = 0
    mu = inputs["old_per_token_logps"] - 0.25
    mu[1, 0] = math.nan
    cols = dump_columns({**inputs, "tool_mask": tool, "sampling_per_token_logps": mu}, logp, None)
    assert torch.equal(cols["mask_BT"], inputs["completion_mask"] * tool) and cols["mask_BT"][0, 1] == 0
    assert cols["logp_mu_BT"][1, 0] == inputs["old_per_token_logps"][1, 0] and cols["logp_mu_BT"][0, 0] == mu[0, 0]
    assert not cols["logp_current_BT"].requires_grad
    on_policy = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
    cols = dump_columns({**on_policy, "sampling_per_token_logps": mu}, logp, None)
    assert cols["logp_behave_old_BT"] is None and cols["logp_mu_BT"][1, 0] == logp[1, 0]
    assert dump_columns(inputs, logp, None)["logp_mu_BT"] is None

    trainer = make_trainer(tmp_path)
    dump = LogProbDump(tmp_path / "d.jsonl").attach(trainer)
    assert trainer.tether_dumps == [dump] and dump.fed_by == "TetherGRPOTrainer"
    assert "_compute_loss" not in vars(trainer)  # not wrapped: TetherGRPOTrainer's own loss feeds it


def test_attach_refuses_a_loss_that_does_not_make_exactly_one_forward(tmp_path):
    """The stock-trainer wrapper reads the one log-prob forward of TRL's loss; a TRL whose loss makes two (or
    none) would dump the wrong tensors, so it is an error that names the reason."""
    from types import SimpleNamespace

    from tether.adapters.trl_dump import feed_from_trl_loss

    inputs, logp = batch(8, 1)

    class Fake(SimpleNamespace):
        def _get_per_token_logps_and_entropies(self, *a, **k):
            return logp, None, None

        def _compute_loss(self, model, inputs):
            for _ in range(self.forwards):
                self._get_per_token_logps_and_entropies(model)
            return logp.sum()

    fake = Fake(forwards=2, model=SimpleNamespace(training=True), state=SimpleNamespace(global_step=0))
    feed_from_trl_loss(fake)
    with pytest.raises(RuntimeError, match="made 2 log-prob forwards, expected one"):
        fake._compute_loss(None, inputs)
    fake.forwards = 1
    rows = []
    fake.tether_dumps.append(SimpleNamespace(record_batch=lambda **cols: rows.append(cols)))
    assert fake._compute_loss(None, inputs) == logp.sum()
    assert len(rows) == 1 and rows[0]["step"] == 0 and torch.equal(rows[0]["logp_current_BT"], logp.detach())
