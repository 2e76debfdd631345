"""RAM / RAM+ / averaging (tether.merge.ram) against per-coordinate Python loops written from the equations
in shared/methods.md §6 (d)6, on random sparse task vectors and the edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from tether.merge.ram import (
    MergeMethod,
    OverlapRatio,
    average_delta,
    merge_state_dicts,
    overlap_counts,
    overlap_ratio,
    ram_delta,
    ram_plus_delta,
    rescale_factors,
    stack_deltas,
)

T = 1e-5


def sparse_deltas(n: int, shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """``n`` task vectors, each changed on a random ``density`` fraction of coordinates (the rest exactly 0,
    plus some sub-threshold noise that must count as unchanged)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    keep = torch.rand((n, *shape), generator=g) < density
    noise = (torch.rand((n, *shape), generator=g, dtype=torch.float64) - 0.5) * T  # |noise| <= T/2
    return torch.where(keep, values, noise)


def loop_reference(deltas: torch.Tensor, method: str, lambdas=None, threshold: float = T) -> torch.Tensor:
    """Δ coordinate by coordinate, the obvious way."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1).tolist()
    out = []
    for i in range(len(flat[0])):
        taus = [flat[j][i] for j in range(n)]
        if method == "average":
            out.append(sum(taus) / n)
            continue
        changed = [j for j in range(n) if abs(taus[j]) > threshold]
        if not changed:
            out.append(0.0)
        elif len(changed) >= 2 or method == "ram":
            out.append(sum(taus[j] for j in changed) / len(changed))
        else:  # ram-plus, unique coordinate
            (j,) = changed
            out.append(lambdas[j] * taus[j])
    return torch.tensor(out, dtype=torch.float64).reshape(deltas.shape[1:])


def loop_counts(deltas: torch.Tensor, threshold: float = T) -> tuple[list[int], list[int]]:
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1).tolist()
    changed, shared = [0] * n, [0] * n
    for i in range(len(flat[0])):
        who = [j for j in range(n) if abs(flat[j][i]) > threshold]
        for j in who:
            changed[j] += 1
            shared[j] += len(who) >= 2
    return changed, shared


def loop_lambdas(changed, shared, r, ratio):
    out = []
    for c, s in zip(changed, shared):
        if c == 0:
            rho = 0.0
        elif ratio == "changed":
            rho = s / c
        else:
            rho = math.inf if c == s else s / (c - s)
        out.append(1.0 + (r - 1.0) * max(0.0, min(1.0, rho)))
    return out


@pytest.mark.parametrize("n,density,seed", [(2, 0.3, 0), (3, 0.2, 1), (4, 0.5, 2), (3, 0.05, 3)])
def test_each_merge_matches_the_loop(n, density, seed):
    deltas = sparse_deltas(n, (7, 5), density, seed)
    torch.testing.assert_close(average_delta(deltas), loop_reference(deltas, "average"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ram_delta(deltas, T), loop_reference(deltas, "ram"), rtol=1e-12, atol=1e-12)
    lambdas = [1.0 + 0.1 * (j + 1) for j in range(n)]
    torch.testing.assert_close(ram_plus_delta(deltas, lambdas, T), loop_reference(deltas, "ram-plus", lambdas),
                               rtol=1e-12, atol=1e-12)


def test_counts_and_rescale_factors_match_the_loop():
    deltas = sparse_deltas(3, (11, 4), 0.3, 5)
    changed, shared = overlap_counts(deltas, T)
    want_c, want_s = loop_counts(deltas)
    assert changed.tolist() == want_c and shared.tolist() == want_s
    assert all(0 < s < c for c, s in zip(want_c, want_s))  # the case under test has both kinds
    for ratio in ("unique", "changed"):
        got = rescale_factors(want_c, want_s, rescale=1.3, ratio=OverlapRatio(ratio))
        assert got == pytest.approx(loop_lambdas(want_c, want_s, 1.3, ratio), rel=1e-12)
    # the two readings differ: shared/unique vs shared/changed
    assert rescale_factors([10], [4], rescale=2.0, ratio=OverlapRatio.UNIQUE) == pytest.approx([1 + 4 / 6])
    assert rescale_factors([10], [4], rescale=2.0, ratio=OverlapRatio.CHANGED) == pytest.approx([1.4])
    assert rescale_factors([10], [8], rescale=2.0, ratio=OverlapRatio.UNIQUE) == pytest.approx([2.0])  # clipped at 1


def test_overlap_ratio_edges():
    assert overlap_ratio(0, 0) == 0.0 and overlap_ratio(0, 0, OverlapRatio.CHANGED) == 0.0
    assert overlap_ratio(5, 5) == math.inf and overlap_ratio(5, 5, OverlapRatio.CHANGED) == 1.0
    assert overlap_ratio(5, 0) == 0.0
    with pytest.raises(ValueError, match="shared <= changed"):
        overlap_ratio(3, 4)
    with pytest.raises(ValueError, match=">= 1"):
        rescale_factors([1], [0], rescale=0.9)


def test_whole_model_merge_matches_the_loop_with_model_level_lambdas():
    """λ_j come from counts over all parameters together, not per parameter."""
    names = {"a.weight": (6, 4), "b.bias": (9,), "c": (2, 3, 2)}
    deltas = {k: sparse_deltas(3, s, 0.25, i) for i, (k, s) in enumerate(names.items())}
    g = torch.Generator().manual_seed(9)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in names.items()}
    models = [{k: base[k] + deltas[k][j] for k in names} for j in range(3)]
    want_c, want_s = [0] * 3, [0] * 3
    for d in deltas.values():
        c, s = loop_counts(d)
        want_c = [a + b for a, b in zip(want_c, c)]
        want_s = [a + b for a, b in zip(want_s, s)]
    lam = loop_lambdas(want_c, want_s, 1.2, "unique")
    for method in ("average", "ram", "ram-plus"):
        merged, stats, lambdas = merge_state_dicts(base, models, MergeMethod(method), threshold=T, rescale=1.2)
        assert [s.changed for s in stats] == want_c and [s.shared for s in stats] == want_s
        assert all(s.total == sum(math.prod(v) for v in names.values()) for s in stats)
        assert lambdas == (pytest.approx(lam, rel=1e-12) if method == "ram-plus" else [1.0] * 3)
        for k in names:
            want = base[k] + loop_reference(deltas[k], method, lam)
            torch.testing.assert_close(merged[k], want, rtol=1e-12, atol=1e-12)
            assert merged[k].dtype == base[k].dtype


def test_all_shared_gives_ram_equal_to_averaging():
    deltas = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 5.0  # all > T
    torch.testing.assert_close(ram_delta(deltas, T), average_delta(deltas), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ram_plus_delta(deltas, [3.0, 3.0, 3.0], T), average_delta(deltas), rtol=1e-12, atol=1e-12)


def test_none_shared_keeps_every_change_at_full_size():
    deltas = torch.zeros(3, 9, dtype=torch.float64)
    for j in range(3):
        deltas[j, 3 * j:3 * j + 3] = torch.tensor([1.0, -2.0, 0.5]) * (j + 1)
    torch.testing.assert_close(ram_delta(deltas, T), deltas.sum(0), rtol=0, atol=0)
    torch.testing.assert_close(average_delta(deltas), deltas.sum(0) / 3, rtol=0, atol=0)  # diluted by 1/N
    lam = [1.0, 1.5, 2.0]
    torch.testing.assert_close(ram_plus_delta(deltas, lam, T),
                               (deltas * torch.tensor(lam, dtype=torch.float64)[:, None]).sum(0), rtol=0, atol=0)
    base = {"w": torch.zeros(9, dtype=torch.float64)}
    _, stats, lambdas = merge_state_dicts(base, [{"w": d} for d in deltas], MergeMethod.RAM_PLUS, rescale=1.5)
    assert [s.shared for s in stats] == [0, 0, 0] and lambdas == [1.0, 1.0, 1.0]  # ρ = 0: λ = 1


def test_single_model():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(30, generator=g)}
    tau = sparse_deltas(1, (30,), 0.4, 7)[0].float()
    model = {"w": base["w"] + tau}
    kept = torch.where(tau.abs() > T, tau, torch.zeros_like(tau))
    for method in MergeMethod:
        merged, stats, lambdas = merge_state_dicts(base, [model], method, rescale=1.5)
        want = model["w"] if method is MergeMethod.AVERAGE else base["w"] + kept
        torch.testing.assert_close(merged["w"], want, rtol=1e-6, atol=1e-6)
        assert stats[0].shared == 0 and lambdas == [1.0]


def test_threshold_zero_counts_every_nonzero_change():
    deltas = torch.tensor([[1e-9, 0.0, 2.0], [1e-9, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ram_delta(deltas, 0.0), torch.tensor([1e-9, 3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(ram_delta(deltas, 1e-5), torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64))


def test_mismatched_shapes_and_names_are_errors_naming_the_parameter():
    base = {"layer.weight": torch.zeros(3, 4), "layer.bias": torch.zeros(3)}
    good = {"layer.weight": torch.ones(3, 4), "layer.bias": torch.ones(3)}
    bad_shape = {"layer.weight": torch.ones(4, 3), "layer.bias": torch.ones(3)}
    with pytest.raises(ValueError, match=r"'layer.weight': B has shape \(4, 3\), the base has \(3, 4\)"):
        merge_state_dicts(base, [good, bad_shape], MergeMethod.RAM, labels=["A", "B"])
    with pytest.raises(ValueError, match="B lacks parameter 'layer.bias'"):
        merge_state_dicts(base, [good, {"layer.weight": torch.ones(3, 4)}], MergeMethod.RAM, labels=["A", "B"])
    with pytest.raises(ValueError, match="A has parameter 'extra' the base lacks"):
        merge_state_dicts(base, [{**good, "extra": torch.ones(1)}], MergeMethod.RAM, labels=["A"])
    with pytest.raises(ValueError, match="'ids': the base has dtype torch.int64"):
        stack_deltas("ids", torch.zeros(2, dtype=torch.long), [torch.ones(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="at least one"):
        merge_state_dicts(base, [], MergeMethod.RAM)
    with pytest.raises(ValueError, match="threshold"):
        merge_state_dicts(base, [good], MergeMethod.RAM, threshold=-1.0)
    with pytest.raises(ValueError, match="rescale factors for 2"):
        ram_plus_delta(torch.zeros(2, 3), [1.0])


def test_merge_keeps_the_base_dtype_and_merges_in_float32():
    base = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)}
    a = {"w": torch.tensor([1.5, 2.0, 3.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([1.0, 2.5, 3.0], dtype=torch.bfloat16)}
    merged, _, _ = merge_state_dicts(base, [a, b], MergeMethod.RAM)
    assert merged["w"].dtype == torch.bfloat16
    assert merged["w"].tolist() == [1.5, 2.5, 3.0]
    merged, _, _ = merge_state_dicts(base, [a, b], MergeMethod.AVERAGE)
    assert merged["w"].tolist() == [1.25, 2.25, 3.0]
