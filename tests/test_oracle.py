"""The oracle benchmark's backprop measurements against their definitions, on a tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tiny import tiny_model, tokenizer

from benchmarks.oracle import NORM, Spec, choose, group_names, group_stats, measure, step_scale
from curvzo import scoring


@dataclass(frozen=True)
class Ex:
    prompt: str
    choices: tuple[str, ...]
    target: int
    answers: tuple[str, ...] = ()


CHOICES = (" yes", " no", " maybe")
EXAMPLES = [
    Ex("Is the sky blue? Answer:", CHOICES, 0),
    Ex("Is fire cold? Answer:", CHOICES, 1),
    Ex("Will it rain tomorrow? Answer:", CHOICES, 2),
    Ex("Do fish swim? Answer:", CHOICES, 0),
    Ex("Can stones fly? Answer:", CHOICES, 1),
    Ex("Is the movie good? Answer:", CHOICES, 2),
]


def _setup() -> tuple[torch.nn.Module, list[torch.nn.Parameter], scoring.Batch]:
    model = tiny_model("llama", seed=3, tie_word_embeddings=True)
    batch = scoring.encode(tokenizer(), EXAMPLES, max_length=32)
    return model, [p for p in model.parameters() if p.requires_grad], batch


def _exact_gn_trace(model: torch.nn.Module, params: list, batch: scoring.Batch) -> list[float]:
    """tr(GN_b) = (1/n) sum_i sum_cc' M_i[c,c'] <d logit_ic, d logit_ic'>, from per-logit gradients."""
    with torch.enable_grad():
        logits = scoring.classification_logits(model, batch)
        n, c = logits.shape
        p = torch.softmax(logits.detach().double(), -1)
        total = [0.0] * len(params)
        for i in range(n):
            rows = [torch.autograd.grad(logits[i, k], params, retain_graph=True) for k in range(c)]
            m = torch.diag(p[i]) - torch.outer(p[i], p[i])
            for b in range(len(params)):
                gram = torch.stack([torch.stack([(rows[k][b].double() * rows[j][b].double()).sum() for j in range(c)])
                                    for k in range(c)])
                total[b] += float((m * gram).sum()) / n
    return total


def test_energy_and_signal_are_the_batch_and_half_batch_gradients() -> None:
    model, params, batch = _setup()
    measured = measure(model, params, [batch], samples=1, gen=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        logits = scoring.classification_logits(model, batch)
        full = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, batch.targets), params, retain_graph=True)
        a = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[:3], batch.targets[:3]), params, retain_graph=True)
        b = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[3:], batch.targets[3:]), params)
    for i in range(len(params)):
        assert math.isclose(measured["energy"][i], float(full[i].double().pow(2).sum()), rel_tol=1e-4, abs_tol=1e-12)
        assert math.isclose(measured["signal"][i], float((a[i].double() * b[i].double()).sum()), rel_tol=1e-4, abs_tol=1e-12)


def test_with_several_batches_the_signal_is_the_all_pairs_estimate_and_the_energy_the_mean() -> None:
    model, params, _ = _setup()
    batches = [scoring.encode(tokenizer(), EXAMPLES[i:i + 2], max_length=32) for i in (0, 2, 4)]
    measured = measure(model, params, batches, samples=1, gen=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(scoring.classification_logits(model, b),
                                                                       b.targets), params) for b in batches]
    for t in range(len(params)):
        g = [grads[i][t].double() for i in range(3)]
        energy = sum(float(x.pow(2).sum()) for x in g) / 3
        signal = sum(float((g[i] * g[j]).sum()) for i in range(3) for j in range(3) if i != j) / 6
        assert math.isclose(measured["energy"][t], energy, rel_tol=1e-4, abs_tol=1e-12)
        assert math.isclose(measured["signal"][t], signal, rel_tol=1e-4, abs_tol=1e-10)


def test_the_probe_trace_is_an_unbiased_estimate_of_the_gauss_newton_trace() -> None:
    model, params, batch = _setup()
    exact = _exact_gn_trace(model, params, batch)
    samples = measure(model, params, [batch], samples=40, gen=torch.Generator().manual_seed(1))["trace_samples"]
    names = [str(i) for i in range(len(params))]
    stats = group_stats({"energy": [0.0] * len(params), "signal": [0.0] * len(params), "trace_samples": samples}, names)
    checked = 0
    for i, name in enumerate(names):
        if exact[i] < 1e-10:
            continue
        checked += 1
        assert abs(stats[name]["trace"] - exact[i]) <= 4 * stats[name]["trace_se"] + 1e-9, (i, stats[name], exact[i])
    assert checked >= len(params) // 2


def test_groups_choose_by_signal_per_curvature_and_scale_the_step_to_equal_noise_within_the_subspace_law() -> None:
    model, params, _ = _setup()
    names = [name for name, _ in model.named_parameters()]
    groups = group_names(list(model.named_parameters()), model.get_input_embeddings().weight)
    assert groups[names.index("model.embed_tokens.weight")] == "embed"
    assert groups[names.index("model.layers.1.mlp.up_proj.weight")] == "L01.mlp"
    assert groups[names.index("model.layers.0.self_attn.q_proj.weight")] == "L00.attn"
    assert groups[names.index("model.norm.weight")] == NORM
    stats = {
        "a": {"energy": 4.0, "signal": 3.0, "trace": 1.0},   # ratio 3
        "b": {"energy": 1.0, "signal": -0.5, "trace": 0.1},  # negative signal: ratio 0
        "c": {"energy": 2.0, "signal": 1.0, "trace": 2.0},   # ratio 0.5
        NORM: {"energy": 0.0, "signal": 0.0, "trace": 1.0},
    }
    assert choose(stats, 2) == ["a", "c"]
    numel = {"a": 1, "b": 1, "c": 1, NORM: 1}
    assert math.isclose(step_scale(stats, numel, ["a", NORM]), math.sqrt((7.0 * 4.1) / (4.0 * 2.0)))
    # a set whose measured energy and curvature are tiny takes no larger step than d/|S|
    assert math.isclose(step_scale(stats, numel, ["b"]), 4.0)
    # for a random fraction f of the energy and the curvature, the rule is the subspace law 1/f
    even = {g: {"energy": 1.0, "signal": 1.0, "trace": 2.0} for g in "abcdefgh"}
    assert math.isclose(step_scale(even, {g: 1 for g in even}, ["a", "b"]), 4.0)


def test_a_choice_is_judged_held_out_and_not_at_all_where_the_dense_signal_is_not_positive() -> None:
    from benchmarks.oracle import selection_checks, subset_gain

    good = {"a": {"energy": 1.0, "signal": 1.0, "trace": 1.0}, "b": {"energy": 1.0, "signal": 0.0, "trace": 3.0}}
    # dense: 1 / sqrt(2 * 4); {a}: 1 / sqrt(1 * 1)
    assert math.isclose(subset_gain(good, ["a"]), math.sqrt(8.0))
    noise = {"a": {"energy": 1.0, "signal": 0.5, "trace": 1.0}, "b": {"energy": 1.0, "signal": -1.0, "trace": 3.0}}
    assert subset_gain(noise, ["a"]) is None
    checks = selection_checks([{"stats": good, "chosen": ["a"]}, {"stats": noise, "chosen": ["b"]},
                               {"stats": good, "chosen": ["a"]}])
    assert checks["gain_held_out"] == [None, 0.0]  # a noise-only measurement judges nothing; {b} has no signal
    assert checks["dense_signal_positive"] == "2/3"


def test_a_report_keeps_the_recorded_rows_of_runs_it_cannot_see_and_refreshes_those_it_can(tmp_path) -> None:
    import json
    import shutil

    from benchmarks.oracle import OUT, report

    recorded = json.loads((OUT / "oracle.json").read_text())
    run = next(OUT.glob("runs/*/*/results.json"))
    result = json.loads(run.read_text())
    stale = next(r for r in recorded["runs"] if (r["task"], r["label"], r["seed"])
                 == (result["task"], result["label"], result["seed"]))
    gone = next(r for r in recorded["runs"] if r["label"] != result["label"])
    (tmp_path / "oracle.json").write_text(json.dumps({"runs": [gone, {**stale, "test": -1.0}]}))
    target = tmp_path / "runs" / run.parent.parent.name / run.parent.name
    target.mkdir(parents=True)
    shutil.copy(run, target / "results.json")
    rows = {(r["task"], r["label"], r["seed"]): r for r in report(tmp_path)["runs"]}
    assert set(rows) == {(gone["task"], gone["label"], gone["seed"]), (result["task"], result["label"], result["seed"])}
    assert rows[(result["task"], result["label"], result["seed"])]["test"] == result["test"]
    assert rows[(gone["task"], gone["label"], gone["seed"])] == gone
    assert (tmp_path / "oracle.md").read_text().count(gone["label"]) == 1


def test_a_fixed_band_is_the_attention_and_mlp_of_each_of_its_layers_and_names_its_run() -> None:
    spec = Spec(task="sst2", seed=0, kappa=0.1, groups=0, refresh=0, policy="fixed", layers="14-15")
    assert spec.fixed_groups() == ["L14.attn", "L14.mlp", "L15.attn", "L15.mlp"]
    assert spec.label == "fixed-L14-15-kappa0.1-r0" and spec.online and spec.scored
