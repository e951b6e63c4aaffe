"""Oracle: how much a gradient-energy-per-curvature block choice can gain over MeZO.

Backprop is allowed here, and only here. Every ``refresh`` steps the exact batch gradients and a
Gauss-Newton (GN) trace of each tensor are measured on the next training examples; the perturbed
set S is the ``k`` groups (a decoder layer's attention or MLP, or the tied embedding) with the
largest ratio of gradient signal to curvature (the Gauss-Southwell-Lipschitz rule), plus the
norm gains with ``--norm``; and the ZO step is the subspace update on S: MeZO on the blocks of S,
with no 1/pi. ``--policy random`` takes the same update and step rule on random groups.

Per tensor b the measurement gives, from the next ``measure_batches`` training batches (one
backward each, or two half-batch backwards when it is 1) and ``samples`` probe backwards over the
batch the next step trains on:

* ``energy``: ||g_b||^2 of a training batch's mean gradient (what the ZO scalar's second moment
  sees), averaged over the batches;
* ``signal``: the all-pairs estimate of ||E g_b||^2 from the batches' (or halves') gradients, an
  unbiased estimate of the squared norm of the expected gradient (minibatch noise has no bias in it);
* ``trace``: tr(GN_b) of the batch-mean loss, GN = (1/n) sum_i J_i^T (diag p_i - p_i p_i^T) J_i over
  the choice logits: with Rademacher xi_i, the gradient G of (1/n) sum_i (M_i^(1/2) xi_i) . logits_i
  has E ||G_b||^2 = tr(GN_b) / n, so each backward is one unbiased sample and their spread gives
  the standard error reported beside the trace.

The step length needs no new lr sweep: with the oracle's own numbers,

    lr_S = kappa * lr_mezo * min( sqrt((||g||^2 tr H) / (||g_S||^2 tr H_S)),  d / |S| )

gives the second-moment term of the descent lemma (lr^2 E[u^T H u], about lr^2 ||g_S||^2 tr H_S
for u = g z_S) the size it has in dense MeZO at the lr the ``long`` profile selected on dev, so
``kappa = 1`` is "as much noise per step as MeZO, spent on the best directions". For a random S
both terms are the random-subspace law d/|S|; the cap keeps a set whose measured energy has
collapsed from taking a step no random set of its size would take. A run that diverges resumes
from its last checkpoint with kappa halved (at most ``MAX_BACKOFFS`` times), so every run ends
with the largest stable multiple of its rule that it found, and says so.

The squared rule, (||g||^2 tr H)/(||g_S||^2 tr H_S) without the root, is rejected: it is 1/f^2 for
a random fraction f, and both of its runs (seed 0, k = 4, norm gains on) diverged, SST-2 at step
70 from 26x MeZO's lr and MR at step 61 (rejected/squared-scale/).

Forward-only rules run in the same harness and are judged by the same measurements (taken every
``refresh`` steps, 0 for none, beside their own scores): ``--policy online`` chooses one group at a
time by the bandit of :mod:`benchmarks.online`, ``--policy dense`` perturbs every group with that
module's Newton step (MeZO with the normalisation, the control), ``--policy fixed`` perturbs a
fixed band of decoder layers (``--layers``, attention and MLP) with the same step: a prior, chosen
once where the oracle's choices concentrate, that costs nothing to apply; ``--policy curvzo`` runs the
``curvzo`` preset at its selected lr so that its block scores can be ranked against the oracle's.

    python -m benchmarks.oracle run --task sst2 --kappa 1 --groups 4     # one run, resumable
    python -m benchmarks.oracle run --task sst2 --policy online --band 5 --kappa 0.1 --refresh 100
    python -m benchmarks.oracle report                                   # oracle.json + table

One run per folder (``<out>/runs/<task>/<label>-s<seed>/``): a checkpoint at each evaluation
(weights, best weights, counters), ``results.json`` when done (then the weights are deleted).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks._common import DEFAULT_DATA_DIR, REPO_ROOT, RESULTS_DIR, format_table, quiet_transformers, save_figure, write_json
from benchmarks.online import Bandit, Probe, ProbeStats, newton_lr, spearman
from curvzo import scoring
from curvzo.bench.report import forward_to_reach, mean_curve
from curvzo.bench.store import read_record
from curvzo.config import TrainConfig
from curvzo.io import atomic_write
from curvzo.divergence import DivergenceGuard
from curvzo.finetune import active_blocks, build_training_optimizer, evaluate, setup, train_batch, weights_on_cpu

OUT = RESULTS_DIR / "oracle"
LONG_ACCURACY = RESULTS_DIR / "long" / "accuracy.json"

#: MeZO's dev-selected lr per task in the ``long`` profile (benchmarks/results/long/accuracy.md).
MEZO_LR = {"sst2": 5e-5, "mr": 1e-4, "cb": 5e-5, "boolq": 2e-4}

#: The ``curvzo`` preset's dev-selected lr per task in the ``long`` profile.
CURVZO_LR = {"sst2": 2.5e-5, "mr": 1e-4, "cb": 2.5e-5, "boolq": 1e-4}

#: The ``long`` protocol, so that runs compare with its finished MeZO rows.
LONG = dict(steps=400, batch_size=16, max_length=64, num_train=1000, num_dev=100, num_test=300, eval_every=50)

#: How many times a diverged run resumes from its last checkpoint with kappa halved.
MAX_BACKOFFS = 4

_LAYER = re.compile(r"(?:layers|h|layer)\.(\d+)\.")
NORM = "norm"  # norm gains and biases (vectors): perturbed at every step, or never (``Spec.norm``)


# ------------------------------------------------------------------------------------ groups
def group_of(name: str, param: torch.Tensor, embedding: torch.Tensor, band: int = 1) -> str:
    """The oracle's group of a trainable tensor: ``embed`` (tied embedding / LM head), ``norm``
    (every vector), ``L<i>.attn`` / ``L<i>.mlp`` (the halves of ``band`` consecutive decoder layers
    from layer i), else the name."""
    if param is embedding:
        return "embed"
    if param.dim() < 2:
        return NORM
    match = _LAYER.search(name)
    if match is None:
        return name
    kind = "attn" if "attn" in name else "mlp" if "mlp" in name else "other"
    first = int(match.group(1)) // band * band
    return f"L{first:02d}.{kind}"


def group_names(named: Sequence[tuple[str, torch.nn.Parameter]], embedding: torch.Tensor, band: int = 1) -> list[str]:
    return [group_of(name, p, embedding, band) for name, p in named]


def by_group(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Sum per-tensor values into their groups."""
    out: dict[str, float] = {}
    for value, group in zip(values, groups):
        out[group] = out.get(group, 0.0) + float(value)
    return out


# ------------------------------------------------------------------------------------ the measurement
#: The squared norms of the parts of tensor ``b``'s gradient that a measurement reports, given
#: (b, gradient): the oracle's parts are whole tensors; other benchmarks split them (by a mask).
Parts = Callable[[int, torch.Tensor], list[float]]


def whole(_: int, g: torch.Tensor) -> list[float]:
    return [float(g.double().pow(2).sum())]


def _sq_norms(grads: Sequence[torch.Tensor], parts: Parts = whole) -> list[float]:
    return [v for b, g in enumerate(grads) for v in parts(b, g)]


def _sqrt_fisher(p: torch.Tensor) -> torch.Tensor:
    """Symmetric square roots of diag(p_i) - p_i p_i^T (one C x C matrix per example)."""
    m = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    values, vectors = torch.linalg.eigh(m.double())
    return (vectors * values.clamp_min(0.0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)


def _part_grads(model: torch.nn.Module, params: Sequence[torch.Tensor], batches: Sequence[Any]):
    """(examples, gradient of their mean label loss) per part: the two halves of a single batch, or
    each of several batches."""
    with torch.enable_grad():
        if len(batches) > 1:
            for batch in batches:
                loss = torch.nn.functional.cross_entropy(scoring.classification_logits(model, batch), batch.targets)
                yield batch.targets.shape[0], [g.detach() for g in torch.autograd.grad(loss, params)]
            return
        logits, targets = scoring.classification_logits(model, batches[0]), batches[0].targets
        n = targets.shape[0]
        for part in (slice(0, n // 2), slice(n // 2, n)):
            loss = torch.nn.functional.cross_entropy(logits[part], targets[part])
            yield part.stop - part.start, [g.detach() for g in torch.autograd.grad(loss, params, retain_graph=True)]


def _trace_samples(model: torch.nn.Module, params: Sequence[torch.Tensor], batch: Any, samples: int,
                   gen: torch.Generator, parts: Parts) -> list[list[float]]:
    with torch.enable_grad():
        logits = scoring.classification_logits(model, batch)
        n = logits.shape[0]
        roots = _sqrt_fisher(torch.softmax(logits.detach().double(), dim=-1)).float()
        traces = []
        for s in range(samples):
            xi = torch.randint(0, 2, logits.shape, generator=gen).float() * 2.0 - 1.0
            probe = (torch.einsum("icd,id->ic", roots, xi) * logits).sum() / n
            grads = torch.autograd.grad(probe, params, retain_graph=s < samples - 1)
            traces.append([n * v for v in _sq_norms(grads, parts)])
    return traces


def measure(model: torch.nn.Module, params: Sequence[torch.Tensor], batches: Sequence[Any], samples: int,
            gen: torch.Generator, parts: Parts = whole) -> dict[str, list]:
    """Per-tensor ``energy``, ``signal`` and ``trace`` samples (see the module docstring), or per
    part of each tensor, in the order ``parts`` gives them.

    ``batches[0]`` is the batch the next step trains on; the trace is probed there. The signal is
    the all-pairs estimate of ||E g||^2 from the parts' gradients g_i with weights w_i (their
    sizes), (||sum w_i g_i||^2 - sum w_i^2 ||g_i||^2) / sum_{i != j} w_i w_j: <g_A, g_B> for the
    two halves of one batch, and far less noisy with m batches. The energy is what one step's batch
    gradient carries: ||g||^2 of the single batch, or the mean of the m batches' ||g_i||^2.
    """
    total: list[torch.Tensor] = []
    sizes, norms = [], []  # per part: its examples, its tensors' ||g_i||^2
    for size, grads in _part_grads(model, params, batches):
        sizes.append(size)
        norms.append(_sq_norms(grads, parts))
        scaled = [size * g.double() for g in grads]
        total = scaled if not total else [t.add_(x) for t, x in zip(total, scaled)]
    n = sum(sizes)
    pairs = n * n - sum(k * k for k in sizes)
    sum_sq = _sq_norms(total, parts)
    weight_sq = [sum(k * k * part[b] for k, part in zip(sizes, norms)) for b in range(len(sum_sq))]
    signal = [(t - w) / pairs for t, w in zip(sum_sq, weight_sq)]
    if len(batches) == 1:
        energy = [t / n**2 for t in sum_sq]
    else:
        energy = [sum(part[b] for part in norms) / len(norms) for b in range(len(sum_sq))]
    return {"energy": energy, "signal": signal,
            "trace_samples": _trace_samples(model, params, batches[0], samples, gen, parts)}


def group_stats(m: dict[str, list], groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-group energy, signal, trace and the trace's standard error over the probe samples."""
    energy, signal = by_group(m["energy"], groups), by_group(m["signal"], groups)
    per_sample = [by_group(sample, groups) for sample in m["trace_samples"]]
    out = {}
    for g in energy:
        values = [s[g] for s in per_sample]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
        out[g] = {"energy": energy[g], "signal": signal[g], "trace": mean,
                  "trace_se": math.sqrt(var / len(values))}
    return out


def gsl_ratio(stats: dict[str, float]) -> float:
    """Gradient signal per unit of curvature (0 where the signal estimate is not positive)."""
    return max(0.0, stats["signal"]) / max(stats["trace"], 1e-30)


def choose(stats: dict[str, dict[str, float]], k: int) -> list[str]:
    """The ``k`` groups with the largest GSL ratio (the norm group is never one of them)."""
    ranked = sorted((g for g in stats if g != NORM), key=lambda g: gsl_ratio(stats[g]), reverse=True)
    return ranked[:k]


def step_scale(stats: dict[str, dict[str, float]], numel: dict[str, float], sub: Sequence[str]) -> float:
    """The factor on MeZO's lr for the subspace ``sub`` (the module docstring's rule)."""
    total_e = sum(s["energy"] for s in stats.values())
    total_t = sum(s["trace"] for s in stats.values())
    sub_e = sum(stats[g]["energy"] for g in sub)
    sub_t = sum(stats[g]["trace"] for g in sub)
    equal_noise = math.sqrt((total_e * total_t) / max(sub_e * sub_t, 1e-30))
    return min(equal_noise, sum(numel.values()) / sum(numel[g] for g in sub))


# ------------------------------------------------------------------------------------ one run
#: Policies whose runs are driven by forward-only rules (judged by the oracle's measurements, not
#: chosen by them), and those of them that take the forward-only Newton step.
SCORED_POLICIES = ("online", "dense", "fixed", "curvzo")
NEWTON_POLICIES = ("online", "dense", "fixed")
POLICIES = ("gsl", "random", *SCORED_POLICIES)


@dataclass(frozen=True)
class Spec:
    task: str
    seed: int
    kappa: float
    groups: int
    refresh: int = 25
    samples: int = 4
    #: "gsl" (oracle), "random" (the same subspace update on random groups), "online" (the
    #: forward-only bandit of ``benchmarks.online``), "dense" (every group, the online step rule)
    #: "fixed" (the decoder layers ``layers``, the online step rule) or "curvzo" (the ``curvzo-sparse``
    #: preset at its selected lr, its block scores judged by the oracle)
    policy: str = "gsl"
    norm: bool = False  # whether the norm gains are perturbed at every step
    measure_batches: int = 1  # training batches the signal and energy are measured on (from the next)
    steps: int = LONG["steps"]
    data_dir: str = str(DEFAULT_DATA_DIR)
    model: str = "smollm2-135m"
    band: int = 1  # decoder layers per group
    hold: int = 5  # online: steps a pulled arm stays perturbed
    explore: float = 0.25  # online: probability that a hold pulls the stalest arm
    forget: float = 0.99  # online: per-step decay of the arms' sums
    layers: str = "14-17"  # fixed: the first and last decoder layer perturbed (attention and MLP)

    @property
    def scored(self) -> bool:
        """Whether the run is driven by forward-only scores (``online``, ``dense``, ``curvzo``) that
        the oracle measurements every ``refresh`` steps judge, rather than chosen by them."""
        return self.policy in SCORED_POLICIES

    @property
    def online(self) -> bool:
        """Whether the step rule is the forward-only one (``kappa`` is then the Newton factor and
        ``refresh`` the steps between the oracle measurements that score it, 0 for none)."""
        return self.policy in NEWTON_POLICIES

    @property
    def label(self) -> str:
        steps = "" if self.steps == LONG["steps"] else f"-n{self.steps}"
        norm = "-norm" if self.norm else ""
        batches = f"-m{self.measure_batches}" if self.measure_batches > 1 else ""
        band = f"-b{self.band}" if self.band > 1 else ""
        if self.policy == "online":
            return (f"online{band}-h{self.hold}-x{self.explore:g}-f{self.forget:g}{norm}-kappa{self.kappa:g}"
                    f"-r{self.refresh}{batches}{steps}")
        if self.policy == "dense":
            return f"dense{norm}-kappa{self.kappa:g}-r{self.refresh}{batches}{steps}"
        if self.policy == "fixed":
            return f"fixed-L{self.layers}{norm}-kappa{self.kappa:g}-r{self.refresh}{batches}{steps}"
        if self.policy == "curvzo":
            return f"curvzo{band}-r{self.refresh}{batches}{steps}"
        return f"{self.policy}-k{self.groups}{band}{norm}-kappa{self.kappa:g}-r{self.refresh}{batches}{steps}"

    def fixed_groups(self) -> list[str]:
        """The groups of ``policy="fixed"``: attention and MLP of every layer in ``layers``."""
        first, last = (int(x) for x in self.layers.split("-"))
        return [f"L{i:02d}.{kind}" for i in range(first, last + 1) for kind in ("attn", "mlp")]

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.task / f"{self.label}-s{self.seed}"


def _config(spec: Spec) -> TrainConfig:
    method, lr = ("curvzo-sparse", CURVZO_LR[spec.task]) if spec.policy == "curvzo" else ("mezo", MEZO_LR[spec.task])
    return TrainConfig(model=spec.model, task=spec.task, data_dir=spec.data_dir, method=method, seed=spec.seed,
                       lr=lr, embedding_rows=True, rounding="nearest", **{**LONG, "steps": spec.steps})


def _group_scores(optimizer: Any, named: Sequence[tuple[str, torch.nn.Parameter]], groups: Sequence[str]) -> dict[str, float]:
    """The CurvZO preset's block scores summed into the oracle's groups (norm gains left out)."""
    scores = optimizer.scores
    return by_group([float(scores[optimizer.blocks_of(p)].sum()) for _, p in named], groups) | {NORM: 0.0}


def _mask(optimizer: Any, named: Sequence[tuple[str, torch.nn.Parameter]], groups: Sequence[str],
          chosen: set[str], rows: torch.Tensor | None) -> torch.Tensor:
    """Blocks of the chosen groups; of the embedding, only the rows the batch can use."""
    mask = torch.zeros(len(optimizer.blocks), dtype=torch.bool)
    for (_, p), g in zip(named, groups):
        if g in chosen:
            mask[optimizer.blocks_of(p)] = True
    if rows is not None:
        mask &= rows
    return mask


def _select(spec: Spec, stats: dict[str, dict[str, float]], step: int) -> list[str]:
    """The perturbed groups of the steps from ``step``: the chosen ones, plus the norm gains if on."""
    if spec.policy == "gsl":
        chosen = choose(stats, spec.groups)
    else:
        names = sorted(g for g in stats if g != NORM)
        gen = torch.Generator().manual_seed(spec.seed * 7919 + step)
        chosen = [names[i] for i in torch.randperm(len(names), generator=gen)[: spec.groups].tolist()]
    return [*chosen, NORM] if spec.norm and NORM in stats else chosen


def run(spec: Spec, out: Path = OUT, *, progress: bool = True) -> dict[str, Any]:
    """Train one run (resuming from its checkpoint) and write its ``results.json``."""
    folder = spec.folder(out)
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _config(spec)
    task, (train_set, dev_set, test_set), model, tokenizer, named = setup(cfg)
    optimizer = build_training_optimizer(cfg, model, named)
    groups = group_names(named, model.get_input_embeddings().weight, spec.band)
    numel = by_group([p.numel() for _, p in named], groups)
    params = [p for _, p in named]
    arms = sorted(set(groups) - {NORM})
    fixed = [*spec.fixed_groups(), *([NORM] if spec.norm else [])] if spec.policy == "fixed" else []
    if not set(fixed) <= set(groups):
        raise SystemExit(f"--layers {spec.layers}: the model has no group {sorted(set(fixed) - set(groups))[0]}")
    bandit = Bandit(arms, hold=spec.hold, explore=spec.explore, forget=spec.forget, kappa=spec.kappa,
                    seed=spec.seed)
    state = _resume(folder, named, optimizer)
    if state is None:
        state = {"step": 0, "forward_passes": 0, "evals": [], "measurements": [], "best_dev": None,
                 "best_step": 0, "wall_time_s": 0.0, "measure_time_s": 0.0, "guard": {}, "backoffs": [],
                 "bandit": bandit.new_state(), "dense_curvature": None, "log": []}
        state["zero_shot"] = state["best_dev"] = evaluate(model, tokenizer, task, dev_set, cfg)
        save_file(weights_on_cpu(named), folder / "best.safetensors")
        _checkpoint(folder, named, optimizer, state)
    guard = DivergenceGuard(**state["guard"]) if state["guard"] else DivergenceGuard()
    chosen, lr = None, None
    diverged = None
    while state["step"] < cfg.steps:
        step = state["step"]
        if spec.scored:
            if spec.refresh and step and step % spec.refresh == 0:
                scores = (_group_scores(optimizer, named, groups) if spec.policy == "curvzo"
                          else {a: float(a in fixed) for a in arms} if spec.policy == "fixed"
                          else bandit.scores(state["bandit"]))
                _score_online(spec, state, scores, model, tokenizer, params, groups, train_set, cfg, step)
            chosen = ([bandit.plan(state["bandit"], step)] if spec.policy == "online"
                      else fixed if spec.policy == "fixed" else arms)
        elif chosen is None or step % spec.refresh == 0:
            chosen, lr = _refresh(spec, state, model, tokenizer, params, groups, numel, train_set, cfg, step)
        clock = time.perf_counter()
        batch = scoring.encode(tokenizer, train_batch(train_set, step, cfg), max_length=cfg.max_length)
        rows = active_blocks(optimizer, model, batch)
        mask = rows if spec.policy == "curvzo" else _mask(optimizer, named, groups, set(chosen), rows)
        if lr is not None:
            _set_lr(optimizer, lr)
        after = (lambda stats: _set_lr(optimizer, _online_lr(spec, state, bandit, chosen, stats))) if spec.online else None
        probe = Probe(model, batch, cfg.eps, after=after)
        loss = optimizer.step(probe, active=mask)
        state["step"] += 1
        state["forward_passes"] += 2 * cfg.batch_size
        state["wall_time_s"] += time.perf_counter() - clock
        _observe(spec, state, bandit, chosen, probe.stats, optimizer.param_groups[0]["lr"], step)
        if progress and state["step"] % 10 == 0:
            print(f"{spec.task} {spec.label} s{spec.seed} step {state['step']} loss {loss:.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.3g} {','.join(chosen) if len(chosen) < 5 else 'all'}",
                  file=sys.stderr, flush=True)
        if guard.update(loss):
            diverged = f"step {state['step']}: {guard.describe()}"
            if len(state["backoffs"]) == MAX_BACKOFFS:
                break
            state = _back_off(folder, named, optimizer, state, diverged)
            guard = DivergenceGuard(**state["guard"]) if state["guard"] else DivergenceGuard()
            chosen, diverged = None, None
            continue
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            dev = evaluate(model, tokenizer, task, dev_set, cfg)
            state["evals"].append({"step": state["step"], "forward_passes": state["forward_passes"], "dev": dev})
            if dev > state["best_dev"]:
                state["best_dev"], state["best_step"] = dev, state["step"]
                save_file(weights_on_cpu(named), folder / "best.safetensors")
            state["guard"] = guard.state_dict()
            _checkpoint(folder, named, optimizer, state)
    _load(named, load_file(folder / "best.safetensors"))
    test = evaluate(model, tokenizer, task, test_set, cfg)
    results = {"task": spec.task, "seed": spec.seed, "label": spec.label, "policy": spec.policy,
               "kappa": spec.kappa, "kappa_final": _kappa(spec, state),
               "backoffs": state["backoffs"], "groups": spec.groups, "norm": spec.norm, "refresh": spec.refresh,
               "samples": spec.samples, "measure_batches": spec.measure_batches, "mezo_lr": MEZO_LR[spec.task],
               "band": spec.band, "hold": spec.hold, "explore": spec.explore, "forget": spec.forget,
               **({"fixed_groups": fixed} if fixed else {}),
               "zero_shot": state["zero_shot"], "best_dev": state["best_dev"], "best_step": state["best_step"], "test": test, "steps": state["step"],
               "forward_passes": state["forward_passes"], "wall_time_s": round(state["wall_time_s"], 1),
               "measure_time_s": round(state["measure_time_s"], 1), "evals": state["evals"],
               "measurements": state["measurements"], "log": state["log"],
               **({"diverged": diverged} if diverged else {})}
    write_json(folder / "results.json", results)
    for name in ("best.safetensors", "checkpoint.safetensors", "checkpoint.pt"):
        (folder / name).unlink(missing_ok=True)
    return results


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _online_lr(spec: Spec, state: dict[str, Any], bandit: Bandit, chosen: list[str], stats: ProbeStats) -> float:
    """The forward-only step length of this step (``benchmarks.online``): kappa over the curvature
    along z, floored at half the running curvature of the pulled arm (or of the dense set)."""
    running = bandit.running_curvature(state["bandit"], chosen[0]) if spec.policy == "online" else state["dense_curvature"]
    return newton_lr(_kappa(spec, state), stats.curvature, running)


def _observe(spec: Spec, state: dict[str, Any], bandit: Bandit, chosen: list[str], stats: ProbeStats | None,
             lr: float, step: int) -> None:
    """Log the step's forward-only statistics; the online rules learn from them."""
    if stats is None:
        return
    state["log"].append({"step": step, "lr": lr, **stats.as_dict(), **({"arm": chosen[0]} if spec.policy == "online" else {})})
    if spec.policy == "online":
        bandit.observe(state["bandit"], chosen[0], stats)
    elif spec.policy in ("dense", "fixed"):  # one running curvature of the perturbed set
        previous = state["dense_curvature"]
        state["dense_curvature"] = stats.curvature if previous is None else 0.9 * previous + 0.1 * stats.curvature


def _score_online(spec: Spec, state: dict[str, Any], scores: dict[str, float], model: torch.nn.Module,
                  tokenizer: Any, params: list, groups: list[str], train_set: list, cfg: TrainConfig, step: int) -> None:
    """Measure the oracle's statistics at ``step`` beside a forward-only rule's group scores (once
    per step, also across a resume): what the rank correlation of those scores is computed from."""
    if any(m["step"] == step for m in state["measurements"]):
        return
    clock = time.perf_counter()
    stats = _measure_groups(spec, model, tokenizer, params, groups, train_set, cfg, step)
    state["measurements"].append({"step": step, "stats": stats, "online_scores": scores})
    state["measure_time_s"] += time.perf_counter() - clock


def _measure_groups(spec: Spec, model: torch.nn.Module, tokenizer: Any, params: list, groups: list[str],
                    train_set: list, cfg: TrainConfig, step: int) -> dict[str, dict[str, float]]:
    """The oracle's per-group statistics at ``step``, on the ``measure_batches`` training batches
    from there; the probes have their own generator, a function of (seed, step), so a resumed run
    measures what the uninterrupted one would have."""
    batches = [scoring.encode(tokenizer, train_batch(train_set, step + i, cfg), max_length=cfg.max_length)
               for i in range(spec.measure_batches)]
    gen = torch.Generator().manual_seed(10_007 * spec.seed + step + 1)
    return group_stats(measure(model, params, batches, spec.samples, gen), groups)


def _back_off(folder: Path, named: list, optimizer: Any, current: dict[str, Any], why: str) -> dict[str, Any]:
    """Return to the last checkpoint with one more halving of kappa recorded (the best weights so
    far stay: they were reached before the divergence). The forwards and time spent past the
    checkpoint are recorded with it, so the run's cost can be counted with or without them."""
    state = _resume(folder, named, optimizer)
    assert state is not None, "a run checkpoints before its first step"
    state["backoffs"] = [*current["backoffs"], {
        "from_step": state["step"], "why": why,
        "forward_passes_discarded": current["forward_passes"] - state["forward_passes"],
        "wall_time_s_discarded": round(current["wall_time_s"] - state["wall_time_s"], 1)}]
    print(f"{folder.name}: diverged ({why}); back to step {state['step']} with kappa x 0.5",
          file=sys.stderr, flush=True)
    return state


def _refresh(spec: Spec, state: dict[str, Any], model: torch.nn.Module, tokenizer: Any, params: list,
             groups: list[str], numel: dict[str, float], train_set: list, cfg: TrainConfig,
             step: int) -> tuple[list[str], float]:
    """Measure (or read back after a resume) the oracle statistics of ``step``; choose S and its lr."""
    done = {m["step"]: m for m in state["measurements"]}
    block = step - step % spec.refresh
    if block not in done:
        clock = time.perf_counter()
        stats = _measure_groups(spec, model, tokenizer, params, groups, train_set, cfg, block)
        chosen = _select(spec, stats, block)
        done[block] = {"step": block, "stats": stats, "chosen": chosen, "scale": step_scale(stats, numel, chosen)}
        state["measurements"].append(done[block])
        state["measure_time_s"] += time.perf_counter() - clock
    entry = done[block]
    return entry["chosen"], _kappa(spec, state) * MEZO_LR[spec.task] * entry["scale"]


def _kappa(spec: Spec, state: dict[str, Any]) -> float:
    """The run's kappa after its back-offs (halved once per divergence)."""
    return spec.kappa * 0.5 ** len(state["backoffs"])


def _checkpoint(folder: Path, named: list, optimizer: Any, state: dict[str, Any]) -> None:
    save_file(weights_on_cpu(named), folder / "checkpoint.tmp.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "state": state}, folder / "checkpoint.tmp.pt")
    (folder / "checkpoint.tmp.safetensors").replace(folder / "checkpoint.safetensors")
    (folder / "checkpoint.tmp.pt").replace(folder / "checkpoint.pt")


def _resume(folder: Path, named: list, optimizer: Any) -> dict[str, Any] | None:
    if not (folder / "checkpoint.pt").exists():
        return None
    saved = torch.load(folder / "checkpoint.pt", weights_only=False)
    _load(named, load_file(folder / "checkpoint.safetensors"))
    optimizer.load_state_dict(saved["optimizer"])
    return saved["state"]


def _load(named: list, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in named:
            p.copy_(weights[name])


# ------------------------------------------------------------------------------------ the report
def subset_gain(stats: dict[str, dict[str, float]], sub: Sequence[str]) -> float | None:
    """Expected one-step decrease of the subspace update on ``sub`` over dense MeZO's, both at the
    equal-noise step: (s_S / sqrt(E_S T_S)) / (s / sqrt(E T)), s the unbiased signal; None where
    the measured dense signal is not positive (the measurement saw no gradient beyond batch noise)."""
    def ratio(groups: Sequence[str]) -> float:
        e = sum(stats[g]["energy"] for g in groups)
        t = sum(stats[g]["trace"] for g in groups)
        return sum(stats[g]["signal"] for g in groups) / math.sqrt(max(e * t, 1e-30))
    dense = ratio(list(stats))
    return ratio(sub) / dense if dense > 0 else None


def selection_checks(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """How well one measurement's choice holds up at the next one (other batches, ``refresh`` steps
    later): the chosen set's predicted gain in sample and held out, and the rank correlation of the
    groups' signal/curvature ratios between consecutive measurements (negative signals kept, so
    the ranking is not tied at zero: the noise the choice is made through)."""
    from scipy.stats import spearmanr

    in_sample, held_out, rho = [], [], []
    for now, later in zip(measurements, measurements[1:]):
        in_sample.append(subset_gain(now["stats"], now["chosen"]))
        held_out.append(subset_gain(later["stats"], now["chosen"]))
        names = sorted(g for g in now["stats"] if g != NORM)
        rho.append(float(spearmanr([now["stats"][g]["signal"] / now["stats"][g]["trace"] for g in names],
                                   [later["stats"][g]["signal"] / later["stats"][g]["trace"] for g in names]).statistic))
    return {"gain_in_sample_median": _median(in_sample), "gain_held_out_median": _median(held_out),
            "ratio_rank_correlation_median": _median(rho), "gain_in_sample": in_sample, "gain_held_out": held_out,
            "ratio_rank_correlation": rho, "dense_signal_positive": _signal_positive(measurements)}


def online_checks(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """How well the bandit's scores rank the groups by the oracle's signal/curvature ratio, measured
    at the same step: the median Spearman correlation over the measurements (groups the bandit
    has not pulled yet score 0 and are ranked with the rest)."""
    rho = []
    for m in measurements:
        names = sorted(g for g in m["online_scores"] if g != NORM)
        rho.append(spearman([m["online_scores"][g] for g in names],
                            [m["stats"][g]["signal"] / m["stats"][g]["trace"] for g in names]))
    return {"online_score_correlation_median": _median(rho), "online_score_correlation": rho,
            "gain_in_sample_median": None, "gain_held_out_median": None, "ratio_rank_correlation_median": None,
            "dense_signal_positive": _signal_positive(measurements)}


def _signal_positive(measurements: list[dict[str, Any]]) -> str | None:
    """"positive/all" over the measurements whose summed signal is positive; None without any."""
    signal = [sum(s["signal"] for s in m["stats"].values()) for m in measurements]
    return f"{sum(x > 0 for x in signal)}/{len(signal)}" if signal else None


def _checks(result: dict[str, Any]) -> dict[str, Any]:
    scored = result["policy"] in SCORED_POLICIES
    return online_checks(result["measurements"]) if scored else selection_checks(result["measurements"])


def _lr_median(result: dict[str, Any]) -> float:
    """The run's median step lr: from its log (forward-only rules), else from its measurements' scales."""
    if result.get("log"):
        return statistics.median(entry["lr"] for entry in result["log"])
    return MEZO_LR[result["task"]] * result["kappa_final"] * statistics.median(m["scale"] for m in result["measurements"])


def _median(values: Sequence[float | None]) -> float | None:
    """Median of the defined values (None where there are none)."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(kept) if kept else None


def mezo_runs(task: str) -> list[dict[str, Any]]:
    """The ``long`` profile's MeZO runs at its selected lr (every seed), with their dev curves (a
    run it reused from another profile is read from there)."""
    rows = [r for r in json.loads(LONG_ACCURACY.read_text())["runs"]
            if r["task"] == task and r["method"] == "mezo" and r["mode"] == "full" and r["lr"] == MEZO_LR[task]]
    return [json.loads(read_record(REPO_ROOT / r["path"], "results.json")) for r in rows]


def compare(result: dict[str, Any], mezo: list[dict[str, Any]]) -> dict[str, Any]:
    """One oracle run against MeZO's seeds: test points over their mean and over the same seed,
    and forwards to reach MeZO's mean final dev accuracy over the forwards MeZO's mean curve needs."""
    tests = [r["test"] for r in mezo]
    same_seed = [r["test"] for r in mezo if r["seed"] == result["seed"]]
    theirs = mean_curve(mezo)
    target = theirs[-1][1]
    reach, own = forward_to_reach(mean_curve([result]), target), forward_to_reach(theirs, target)
    return {"mezo_test_mean": sum(tests) / len(tests), "mezo_seeds": len(tests),
            "oracle_minus_mezo_points": 100.0 * (result["test"] - sum(tests) / len(tests)),
            "oracle_minus_mezo_same_seed_points": 100.0 * (result["test"] - same_seed[0]) if same_seed else None,
            "mezo_final_dev_mean": target,
            "forward_ratio_to_mezo_final": None if reach is None or not own else reach / own}


def _run_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["task"], row["label"], row["seed"]


def _recorded_rows(out: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The rows of the last ``oracle.json``: runs whose folders predate committed ``results.json``
    files exist only there, and a report must not drop them."""
    path = out / "oracle.json"
    return {_run_key(r): r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}


def report(out: Path = OUT) -> dict[str, Any]:
    """``oracle.json``, ``oracle.md`` and ``oracle.png`` from every finished run under ``out/runs``,
    plus the rows of the last report whose run folders are not here."""
    rows = []
    mezo = {}
    recorded = _recorded_rows(out)
    for path in sorted((out / "runs").glob("*/*/results.json")):
        result = json.loads(path.read_text())
        task = result["task"]
        mezo.setdefault(task, mezo_runs(task))
        rows.append({k: result[k] for k in ("task", "seed", "label", "policy", "groups", "norm", "kappa",
                                            "kappa_final", "zero_shot", "best_dev", "best_step", "test",
                                            "forward_passes", "wall_time_s", "measure_time_s")}
                    | {"discarded_forward_passes": sum(b["forward_passes_discarded"] for b in result["backoffs"]),
                       "lr_median": _lr_median(result), "curve": mean_curve([result])}
                    | compare(result, mezo[task]) | _checks(result))
    found = {_run_key(r) for r in rows}
    rows += [r for key, r in recorded.items() if key not in found]
    rows.sort(key=_run_key)
    for task in {r["task"] for r in rows}:
        mezo.setdefault(task, mezo_runs(task))
    doc = {"mezo_lr": MEZO_LR, "protocol": LONG, "runs": rows,
           "curvzo_score_correlation": _score_correlation(rows, "curvzo"),
           "online_score_correlation": _score_correlation(rows, "online"),
           "score_correlation_note": "median over a policy's runs of their median Spearman correlation with "
                                     "the oracle's signal/curvature ratios (None: no such run yet; "
                                     "`run --policy curvzo` measures the curvzo preset's)",
           "mezo_curves": {t: [mean_curve([r]) for r in runs] for t, runs in mezo.items()}}
    write_json(out / "oracle.json", doc)
    _figure(doc, out / "oracle.png")
    atomic_write(out / "oracle.md", lambda tmp: tmp.write_text(_markdown(doc)))
    return doc


def _score_correlation(rows: list[dict[str, Any]], policy: str) -> float | None:
    return _median([r.get("online_score_correlation_median") for r in rows if r["policy"] == policy])


def _figure(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(doc["mezo_curves"])
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, curve in enumerate(doc["mezo_curves"][task]):
            ax.plot(*zip(*curve), color="grey", alpha=0.6, label="mezo (long, each seed)" if i == 0 else None)
        for row in (r for r in doc["runs"] if r["task"] == task):
            ax.plot(*zip(*row["curve"]), marker="o", ms=3, label=f"{row['label']} s{row['seed']}")
        ax.set(title=task, xlabel="forward passes", ylabel="dev accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


COLUMNS = """\
- **kappa**: the multiple of the step rule the run ended with (halved once per divergence);
  **lr/mezo**: its median lr over MeZO's selected lr.
- **vs mezo**: test accuracy minus the mean test accuracy of MeZO's seeds at its selected lr (points);
  **fwd ratio**: forwards to reach MeZO's mean final dev accuracy over the forwards MeZO's mean
  curve needs (- never reached).
- **gain in/held**: median predicted one-step gain over dense MeZO at equal noise of the chosen set,
  on the measurement it was chosen by and on the next one (another batch, ``refresh`` steps later);
  measurements whose dense signal is not positive judge nothing and are left out.
- **rank rho**: median Spearman correlation of the groups' signal/curvature ratios between
  consecutive measurements; **signal>0**: measurements whose summed signal is positive.
- **score rho** (forward-only runs, ``online`` and ``curvzo``): median Spearman correlation of the
  run's group scores (the bandit's, or the ``curvzo`` preset's block scores summed per group) with
  the oracle's signal/curvature ratios measured at the same step (every ``r`` steps).
- ``online``, ``dense`` and ``fixed`` rows use the forward-only Newton step (the engine's
  ``newton=True`` rule): kappa is the fraction of the Newton step, not a multiple of the oracle's
  rule; ``dense`` is MeZO with that rule, ``fixed`` the same on the layers its label names.
- ``r400`` (refresh every 400 steps, the whole run): the oracle's choice is made once, at step 0, and held.
"""


def _markdown(doc: dict[str, Any]) -> str:
    return "\n".join([
        "# Oracle: a backprop-chosen subspace against MeZO",
        "",
        "Generated by `python -m benchmarks.oracle report` from the runs under `benchmarks/results/oracle/runs/`",
        "(each made by `python -m benchmarks.oracle run --task T ...`, flags in its label; their `results.json`",
        "files are committed, and rows of runs made before that are kept from the last report). The protocol is the",
        f"`long` profile's ({', '.join(f'{k}={v}' for k, v in doc['protocol'].items())}).",
        "",
        "```", _table(doc), "```", "",
        *_baselines(doc), "",
        COLUMNS,
        "![dev curves](oracle.png)", ""])


def _baselines(doc: dict[str, Any]) -> list[str]:
    """One line per task on the MeZO rows every run is measured against."""
    lines = []
    for task in sorted(doc["mezo_curves"]):
        row = next(r for r in doc["runs"] if r["task"] == task)
        lines.append(f"- {task}: MeZO at lr {doc['mezo_lr'][task]:g}, {row['mezo_seeds']} seeds: mean test "
                     f"{row['mezo_test_mean']:.3f}, mean final dev {row['mezo_final_dev_mean']:.3f}.")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(doc: dict[str, Any]) -> str:
    headers = ["task", "run", "kappa", "lr/mezo", "dev", "test", "vs mezo (pts)", "fwd ratio",
               "gain in/held", "rank rho", "score rho", "signal>0"]
    rows = [[r["task"], f"{r['label']} s{r['seed']}", r["kappa_final"], r["lr_median"] / doc["mezo_lr"][r["task"]],
             r["best_dev"], r["test"], r["oracle_minus_mezo_points"], r["forward_ratio_to_mezo_final"],
             f"{_fmt(r['gain_in_sample_median'])}/{_fmt(r['gain_held_out_median'])}",
             r["ratio_rank_correlation_median"], r.get("online_score_correlation_median"), r["dense_signal_positive"]]
            for r in doc["runs"]]
    return format_table(headers, rows)


# ------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oracle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one oracle run (resumable)")
    one.add_argument("--task", choices=sorted(MEZO_LR), required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--kappa", type=float, default=1.0)
    one.add_argument("--groups", type=int, default=4)
    one.add_argument("--refresh", type=int, default=25)
    one.add_argument("--samples", type=int, default=4)
    one.add_argument("--policy", choices=POLICIES, default="gsl")
    one.add_argument("--band", type=int, default=1, help="decoder layers per group")
    one.add_argument("--hold", type=int, default=Spec.hold, help="online: steps per pull")
    one.add_argument("--explore", type=float, default=Spec.explore, help="online: probability of pulling the stalest arm")
    one.add_argument("--forget", type=float, default=Spec.forget, help="online: per-step decay of the arms' sums")
    one.add_argument("--norm", action="store_true", help="perturb the norm gains at every step")
    one.add_argument("--layers", default=Spec.layers, help="fixed: first-last decoder layer perturbed (attention and MLP)")
    one.add_argument("--measure-batches", type=int, default=1,
                     help="training batches each measurement uses for signal and energy (1: halves of one)")
    one.add_argument("--steps", type=int, default=LONG["steps"], help="fewer for a smoke test")
    one.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    one.add_argument("--out", type=Path, default=OUT)
    summary = sub.add_parser("report", help="oracle.json, oracle.png and a table from the finished runs")
    summary.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    quiet_transformers()
    if args.command == "run":
        spec = Spec(task=args.task, seed=args.seed, kappa=args.kappa, groups=args.groups, refresh=args.refresh,
                    samples=args.samples, policy=args.policy, norm=args.norm, measure_batches=args.measure_batches,
                    steps=args.steps, data_dir=args.data_dir, band=args.band, hold=args.hold,
                    explore=args.explore, forget=args.forget, layers=args.layers)
        result = run(spec, args.out)
        print(json.dumps({k: result[k] for k in ("task", "label", "best_dev", "test", "wall_time_s")}))
    else:
        print(_table(report(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
