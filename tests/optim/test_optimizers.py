"""Generic checks run over every ZO configuration (torch.optim's OptimizerInfo pattern)."""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from curvzo.optim import NEWTON_FRACTION, PRESETS, CurvZO, MeZO, SparseCurvZO, build_optimizer, decay_param_groups


@dataclass(frozen=True)
class Case:
    desc: str
    cls: type
    kwargs: dict = field(default_factory=dict)


CASES = [
    Case("mezo", MeZO),
    Case("curvzo-pps", SparseCurvZO),
    Case("curvzo-multinomial", SparseCurvZO, {"sampling": "multinomial"}),
    Case("curvzo-uniform", SparseCurvZO, {"sampling": "uniform"}),
    Case("curvzo-square-explore-floor", SparseCurvZO, {"feedback": "square", "explore_mix": "adaptive", "pi_floor": 0.05}),
    Case("curvzo-fixed-rowblocks", SparseCurvZO, {"budget": 0.4, "block_size": 8, "normalize_by_numel": True}),
    Case("curvzo-dense-below", SparseCurvZO, {"dense_below": 4, "block_size": 8}),
    Case("curvzo-subspace-dense", SparseCurvZO, {"correction": "subspace", "dense_below": 4, "block_size": 8}),
    Case("curvzo-subspace-normalize", SparseCurvZO, {"correction": "subspace", "normalize": True}),
    Case("mezo-normalize", MeZO, {"normalize": True}),
]
IDS = [c.desc for c in CASES]

BAD_INPUTS = [
    (MeZO, {"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    (MeZO, {"eps": 0.0}, ValueError, "Invalid eps"),
    (MeZO, {"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    (MeZO, {"seed": 1.5}, TypeError, "seed must be an int"),
    (MeZO, {"block_size": 0}, ValueError, "Invalid block_size: 0"),
    (SparseCurvZO, {"sampling": "random"}, ValueError, "Invalid sampling: 'random'"),
    (SparseCurvZO, {"dense_below": -1}, ValueError, "Invalid dense_below: -1"),
    (SparseCurvZO, {"dense_below": 8, "sampling": "uniform"}, ValueError, "dense_below requires sampling='pps'"),
    (SparseCurvZO, {"correction": "none"}, ValueError, "Invalid correction"),
    (MeZO, {"normalize": 1}, TypeError, "normalize must be a bool"),
    (SparseCurvZO, {"feedback": "cube"}, ValueError, "Invalid feedback: 'cube'"),
    (SparseCurvZO, {"explore_mix": 1.5}, ValueError, "Invalid explore_mix: 1.5"),
    (SparseCurvZO, {"pi_floor": 0.1, "sampling": "uniform"}, ValueError, "pi_floor requires sampling='pps'"),
    (SparseCurvZO, {"budget": 0.0}, ValueError, "Invalid budget: 0.0"),
    (SparseCurvZO, {"budget": "fixed"}, ValueError, "Invalid budget: 'fixed'"),
    (SparseCurvZO, {"init_fraction": 1.5}, ValueError, "Invalid init_fraction: 1.5"),
    (SparseCurvZO, {"budget_every": 0}, ValueError, "Invalid budget_every: 0"),
    (SparseCurvZO, {"score_beta": 0.0}, ValueError, "Invalid score_beta: 0.0"),
]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4,), (3, 5), (2,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def quadratic(params, scales=(1.0, 0.5, 2.0, 1.0)):
    return lambda: sum(s * (p.float() ** 2).sum() for s, p in zip(scales, params))


@pytest.mark.parametrize("cls,kwargs,exc,msg", BAD_INPUTS)
def test_bad_inputs(cls, kwargs, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        cls(make_params(), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_descends_on_quadratic(case):
    params = make_params()
    f = quadratic(params)
    start = f().item()
    opt = case.cls(params, lr=0.004, eps=1e-3, seed=1, **case.kwargs)
    # A normalised step moves lr * g / scale, about lr in size: from this start 400 such steps
    # halve the loss in half of the seeds (median 0.50 over 12), 600 steps in all (at most 0.34).
    for _ in range(600 if case.kwargs.get("normalize") else 400):
        opt.step(f)
    assert f().item() < 0.5 * start


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_is_bit_exact(case, dtype):
    params = make_params(dtype)
    before = [p.detach().clone() for p in params]
    opt = case.cls(params, lr=0.0, eps=1e-2, weight_decay=0.1, seed=3, **case.kwargs)
    for _ in range(25):
        opt.step(quadratic(params))
    for p, b in zip(params, before):
        assert torch.equal(p, b) and p.dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_loss_skips_step(case):
    params = make_params()
    opt = case.cls(params, lr=0.1, seed=0, **case.kwargs)
    opt.step(quadratic(params))
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt._global_state())
    state_before.pop("sampler_state", None)
    opt.step(lambda: torch.tensor(float("nan")))
    assert opt.last_step.skipped
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    state_after = {k: v for k, v in opt._global_state().items() if k != "sampler_state"}
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value) if torch.is_tensor(value) else state_after[key] == value


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_global_rng_untouched(case):
    params = make_params()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    opt = case.cls(params, lr=0.01, seed=0, **case.kwargs)
    for _ in range(5):
        opt.step(quadratic(params))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_closure_called_twice_and_required(case):
    params = make_params()
    opt = case.cls(params, lr=0.01, seed=0, **case.kwargs)
    calls = []
    f = quadratic(params)
    loss = opt.step(lambda: calls.append(1) or f())
    assert len(calls) == 2
    info = opt.last_step
    assert loss == pytest.approx(0.5 * (info.loss_plus + info.loss_minus))
    assert info.grad == pytest.approx((info.loss_plus - info.loss_minus) / (2 * opt.param_groups[0]["eps"]))
    with pytest.raises(RuntimeError, match="requires a closure"):
        opt.step()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_resume_is_bit_identical(case):
    params = make_params()
    opt = case.cls(params, lr=0.01, seed=7, **case.kwargs)
    for _ in range(23):
        opt.step(quadratic(params))
    saved_weights = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())

    clones = [torch.nn.Parameter(w.clone()) for w in saved_weights]
    resumed = case.cls(clones, lr=0.01, seed=999, **case.kwargs)
    resumed.load_state_dict(saved_state)
    for _ in range(23):  # lockstep: the trajectories must agree at every step
        opt.step(quadratic(params))
        resumed.step(quadratic(clones))
        assert opt.last_step.record == resumed.last_step.record
        for a, b in zip(params, clones):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_records_replay_to_identical_weights(case):
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = case.cls(params, lr=0.01, weight_decay=0.05, seed=5, **case.kwargs)
    records = []
    for _ in range(30):
        opt.step(quadratic(params))
        records.append(opt.last_step.record)

    replica = [torch.nn.Parameter(s.clone()) for s in start]
    applier = case.cls(replica, lr=0.01, seed=0, **case.kwargs)
    for record in records:
        applier.apply(record)
    for a, b in zip(params, replica):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_noise_drawn_at_most_three_times_per_sampled_block(case):
    params = make_params()
    opt = case.cls(params, lr=0.01, seed=0, **case.kwargs)
    for _ in range(10):
        before = opt._noise.draws
        opt.step(quadratic(params))
        sampled = sum(opt.blocks[i].numel for i in opt.last_step.record.blocks)
        assert opt._noise.draws - before == 3 * sampled


def _z(opt, block, seed, lo, hi):
    return opt._noise.fill(block, seed, lo, hi, torch.empty(hi - lo)).clone()


@pytest.mark.parametrize("noise", ["gaussian", "generated", "rademacher"])
def test_noise_is_a_pure_function_of_seed_block_and_element(noise):
    """Any range of a block, in any chunking and on any number of threads, holds the same z."""
    big = torch.nn.Parameter(torch.zeros(5 * 16384 + 7))  # units of 16,384 on CPU: six, the last cut short
    opt = MeZO([torch.nn.Parameter(torch.zeros(8)), big], noise=noise)
    block = opt.blocks[1]
    whole = _z(opt, block, 42, 0, block.numel)
    assert whole.abs().max() > 0 and float(whole.var()) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(torch.cat([_z(opt, block, 42, a, min(a + 1000, block.numel)) for a in range(0, block.numel, 1000)]), whole)
    assert torch.equal(_z(opt, block, 42, 20000, 40000), whole[20000:40000])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_z(opt, block, 42, 0, block.numel), whole)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(_z(opt, block, 43, 0, block.numel), whole)
    assert not torch.equal(_z(opt, opt.blocks[0], 42, 0, 8), whole[:8])
    if noise == "rademacher":
        assert set(whole.unique().tolist()) == {-1.0, 1.0}


def test_row_blocks_align_with_rows():
    emb = torch.nn.Parameter(torch.zeros(10, 4))
    opt = MeZO([emb], block_size=9)  # 9 elements round down to 2 whole rows
    assert [(b.start, b.end) for b in opt.blocks] == [(i, min(i + 8, 40)) for i in range(0, 40, 8)]


def test_tied_parameters_are_one_block():
    emb = torch.nn.Embedding(7, 3)
    head = torch.nn.Linear(3, 7, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    opt = MeZO(model.parameters(), lr=0.1)
    assert len(opt.blocks) == 1
    opt.step(lambda: head(emb(torch.tensor([1, 2]))).square().sum())
    assert head.weight is emb.weight


def test_param_groups_and_scheduler():
    a, b = make_params()[:2]
    opt = MeZO([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    f = lambda: (a**2).sum() + (b**2).sum()
    opt.step(f)
    assert opt.last_step.record.lr == (0.1, 0.5)
    sched.step()
    opt.step(f)
    assert opt.last_step.record.lr == (0.05, 0.25)


def test_weight_decay_only_on_decay_group():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = decay_param_groups(model.named_parameters(), weight_decay=0.5)
    assert [len(g["params"]) for g in groups] == [1, 3]
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(groups, lr=0.1, seed=0)
    opt.step(lambda: torch.tensor(1.0))  # flat loss: g = 0, only decay moves weights
    after = list(model.parameters())
    assert torch.allclose(after[0], before[0] * (1 - 0.1 * 0.5))
    for p, b in zip(after[1:], before[1:]):
        assert torch.equal(p, b)


def test_hf_estimator_is_unbiased_for_every_sampling():
    """Mean of many HT-corrected sparse estimates approaches the true gradient (linear loss).

    Judged against the estimates' own spread: sum_i ((mean_i - grad_i) / se_i)^2 is chi-square
    with D degrees of freedom for an unbiased estimator, so a bias of a few standard errors per
    coordinate (or a missing 1/pi) pushes it far above the bound.
    """
    for sampling in ("pps", "multinomial", "uniform"):
        params = make_params()
        coeffs = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        true = torch.cat([c.flatten() for c in coeffs]).double()
        f = lambda: sum((c * p).sum() for c, p in zip(coeffs, params))
        opt = SparseCurvZO(params, lr=1.0, eps=1e-3, seed=11, sampling=sampling, budget=0.5)
        start = [p.detach().clone() for p in params]
        total = torch.zeros_like(true)
        squares = torch.zeros_like(true)
        n = 4000
        for _ in range(n):
            opt.step(f)
            estimate = torch.cat([(s - p.detach()).flatten() for s, p in zip(start, params)]).double()
            total += estimate
            squares += estimate**2
            for p, s in zip(params, start):
                p.data.copy_(s)
        mean = total / n
        standard_error = ((squares / n - mean**2) / n).sqrt()
        chi2 = float((((mean - true) / standard_error) ** 2).sum())
        d = true.numel()
        assert chi2 < d + 5 * (2 * d) ** 0.5, (sampling, chi2)
        assert torch.linalg.vector_norm(mean - true) < 0.35 * torch.linalg.vector_norm(true), sampling


@pytest.mark.parametrize("sampling", ["pps", "uniform"])
def test_adaptive_budget_stays_in_bounds(sampling):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=g)) for _ in range(40)]
    f = lambda: sum((i + 1) ** 2 * (p**2).sum() for i, p in enumerate(params))
    opt = SparseCurvZO(params, lr=1e-4, seed=0, sampling=sampling, budget_every=5)
    for _ in range(300):
        opt.step(f)
        assert 0.1 - 1e-12 <= opt.budget_fraction() <= 0.8 + 1e-12


def test_presets_cover_the_ablations():
    params = make_params()
    assert build_optimizer("uniform-sparse", params).sampling == "uniform"
    assert build_optimizer("curvzo-fixed", params).budget == 0.4
    assert isinstance(build_optimizer("mezo", params), MeZO)
    with pytest.raises(ValueError, match="Unknown ZO method 'adam'"):
        build_optimizer("adam", params)
    assert set(PRESETS) >= {"mezo", "curvzo", "curvzo-ref", "curvzo-sparse", "uniform-sparse", "curvzo-fixed"}
    flagship = build_optimizer("curvzo", params)
    assert isinstance(flagship, CurvZO) and flagship.newton and flagship.param_groups[0]["lr"] == NEWTON_FRACTION


def test_dense_below_perturbs_small_blocks_every_step_and_samples_the_rest():
    small = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    large = [torch.nn.Parameter(torch.zeros(100)) for _ in range(20)]
    opt = SparseCurvZO(small + large, lr=0.0, seed=0, dense_below=10, budget=0.25)
    pi = opt.inclusion_probabilities()
    assert torch.equal(pi[:3], torch.ones(3, dtype=torch.float64))
    assert (pi[3:] < 1).all() and pi[3:].sum().item() == pytest.approx(5.0, abs=1e-6)  # 0.25 of the 20 large blocks
    for _ in range(10):
        opt.step(lambda: sum((p**2).sum() for p in small + large))
        assert set(range(3)) <= set(opt.last_step.record.blocks)
    active = torch.zeros(23, dtype=torch.bool)
    active[[1, 5, 6]] = True
    pi = opt.inclusion_probabilities(active)
    assert pi[1] == 1.0 and pi[0] == 0.0 and pi[2] == 0.0 and (pi[7:] == 0).all()
    everything_small = SparseCurvZO(small, lr=0.0, dense_below=10)
    assert torch.equal(everything_small.inclusion_probabilities(), torch.ones(3, dtype=torch.float64))
    assert build_optimizer("curvzo-sparse", small).param_groups[0]["dense_below"] == 16384
    assert build_optimizer("curvzo-ref", small).param_groups[0]["dense_below"] == 0


def test_scores_stay_float64_across_bf16_state_dict():
    params = make_params(torch.bfloat16)
    opt = SparseCurvZO(params, lr=0.01, seed=0)
    for _ in range(5):
        opt.step(quadratic(params))
    state = copy.deepcopy(opt.state_dict())
    other = SparseCurvZO([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
    other.load_state_dict(state)
    assert other.scores.dtype == torch.float64
    assert torch.equal(other.scores, opt.scores)
    assert math.isclose(other.budget_fraction(), opt.budget_fraction())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_active_rows_restrict_sampling_to_blocks_that_matter(case):
    emb = torch.nn.Parameter(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)))
    bias = torch.nn.Parameter(torch.zeros(3))
    opt = case.cls([emb, bias], lr=0.05, seed=0, **{**case.kwargs, "block_size": 4})
    rows = torch.tensor([1, 7])
    f = lambda: (emb[rows] ** 2).sum() + (bias**2).sum()
    before = emb.detach().clone()
    active = opt.rows_active(emb, rows)
    assert int(active.sum()) == 3  # two row blocks and the bias
    for _ in range(50):
        opt.step(f, active=active)
        assert set(opt.last_step.record.blocks) <= set(active.nonzero().flatten().tolist())
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(emb[untouched], before[untouched])
    assert not torch.equal(emb[rows], before[rows])
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        opt.step(f, active=torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_replaying_gradients_rebuilds_weights_and_state(case):
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = case.cls(params, lr=0.01, seed=5, **case.kwargs)
    active = torch.ones(len(opt.blocks), dtype=torch.bool)
    active[1] = False
    log = []
    for i in range(30):
        mask = active if i % 3 == 0 else None
        closure = (lambda: torch.tensor(float("inf"))) if i == 7 else quadratic(params)
        opt.step(closure, active=mask)
        log.append((opt.last_step.grad, mask))

    replica = [torch.nn.Parameter(s.clone()) for s in start]
    again = case.cls(replica, lr=0.01, seed=5, **case.kwargs)
    for grad, mask in log:
        again.replay(grad, active=mask)
    for a, b in zip(params, replica):
        assert torch.equal(a, b)
    assert again.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 29


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    from curvzo.optim._rounding import round_stochastic

    x = torch.full((200_000,), 1.0 + 1e-4, dtype=torch.float32)  # below half an ulp of 1.0
    rounded = round_stochastic(x, dtype, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) <= {1.0, float(torch.tensor(1.0, dtype=dtype).nextafter(torch.tensor(2.0, dtype=dtype)))}
    assert rounded.mean().item() == pytest.approx(1.0 + 1e-4, abs=3e-5)
    assert torch.equal(x.to(dtype).float(), torch.ones_like(x))  # nearest loses it


def test_bf16_updates_survive_only_with_stochastic_rounding():
    assert _mean_move_on_quadratic(torch.bfloat16, "nearest") == 0.0
    assert _mean_move_on_quadratic(torch.bfloat16, "stochastic") > 0.0


def _mean_move_on_quadratic(dtype: torch.dtype, rounding: str) -> float:
    p = torch.nn.Parameter(torch.full((4096,), 0.5, dtype=dtype))
    opt = MeZO([p], lr=2e-7, eps=1e-2, seed=0, rounding=rounding)
    for _ in range(50):
        opt.step(lambda: (p.float() ** 2).sum())
    return 0.5 - p.float().mean().item()


def test_master_copies_make_bf16_follow_fp32():
    fp32 = _mean_move_on_quadratic(torch.float32, "nearest")
    master = _mean_move_on_quadratic(torch.bfloat16, "master")
    assert fp32 > 0.0
    assert _mean_move_on_quadratic(torch.bfloat16, "nearest") == 0.0
    # the weights are the master's nearest rounding: within half a bf16 ulp of 0.5 of fp32
    assert abs(master - fp32) <= 2.0**-10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_master_mode_resumes_and_replays_bit_identically(case):
    params = make_params(torch.bfloat16)
    start = [p.detach().clone() for p in params]
    opt = case.cls(params, lr=0.01, weight_decay=0.05, seed=4, rounding="master", **case.kwargs)
    records = []
    for _ in range(15):
        opt.step(quadratic(params))
        records.append(opt.last_step.record)
    masters = [opt.state[p]["master"] for p in params if "master" in opt.state[p]]
    assert masters and all(m.dtype == torch.float32 for m in masters)

    replica = [torch.nn.Parameter(s.clone()) for s in start]
    applier = case.cls(replica, lr=0.01, seed=0, rounding="master", **case.kwargs)
    for record in records:
        applier.apply(record)
    assert all(torch.equal(a, b) for a, b in zip(params, replica))

    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = case.cls(clones, lr=0.01, weight_decay=0.05, seed=999, rounding="master", **case.kwargs)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        opt.step(quadratic(params))
        resumed.step(quadratic(clones))
        assert all(torch.equal(a, b) for a, b in zip(params, clones))
    assert all(torch.equal(opt.state[a]["master"], resumed.state[b]["master"])
               for a, b in zip(params, clones) if "master" in opt.state[a])


def test_master_mode_is_a_no_op_for_fp32_and_at_lr_zero():
    params = make_params()
    opt = MeZO(params, lr=0.01, seed=0, rounding="master")
    opt.step(quadratic(params))
    assert not any("master" in opt.state[p] for p in params)
    bf16 = make_params(torch.bfloat16)
    before = [p.detach().clone() for p in bf16]
    still = SparseCurvZO(bf16, lr=0.0, eps=1e-2, seed=0, rounding="master")
    for _ in range(10):
        still.step(quadratic(bf16))
    assert all(torch.equal(p, b) for p, b in zip(bf16, before))


def test_invalid_rounding():
    with pytest.raises(ValueError, match="Invalid rounding: 'up'"):
        MeZO(make_params(), rounding="up")


def test_adaptive_budget_is_computed_over_active_blocks_only():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(50)]
    active = torch.zeros(50, dtype=torch.bool)
    active[:5] = True
    opt = SparseCurvZO(params, lr=0.0, seed=0)
    state = opt._global_state()
    state["scores"][:5] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # flat among the active
    k_before = state["k"]
    opt._update_budget(state, active)
    # Flat active scores: N_eff = n and H = 1, so f_raw = 0.1 + 0.7 * 0.7 whatever the 45 inactive blocks hold.
    assert state["k"] == pytest.approx(0.9 * k_before + 0.1 * 50 * (0.1 + 0.7 * 0.7))


def test_building_without_a_model_warns_once_per_line_with_what_the_fallback_costs():
    from curvzo.optim import FallbackWarning

    net = torch.nn.Linear(4, 2)
    with pytest.warns(FallbackWarning, match="model=") as seen:
        build_optimizer("mezo", net.parameters(), lr=1e-3, eps=1e-3, seed=0)
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    assert seen[0].filename == __file__  # the line that built it, not a line of the library
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer("mezo", net.parameters(), lr=1e-3, eps=1e-3, seed=0, model=net)
