"""python -m benchmarks.estimator_quality

How good is each zeroth-order gradient estimator at the pretrained SmolLM2-135M weights, against
the true gradient, and against the best any block-sampling distribution could do?

What it does (defaults reproduce ``benchmarks/results/estimator_quality.json`` and ``.png``):

1. One fixed SST-2 batch of 16 (``curvzo.data.load_splits`` seed 0, MeZO prompt, label-only
   cross-entropy of :func:`curvzo.scoring.classification_loss`); the true gradient g by backprop.
2. Every method is a real optimizer from :data:`curvzo.optim.PRESETS` (plus option overrides),
   built over two parameter groups (the tied embedding, then every other tensor) so that the
   embedding can get its own ``block_size``. CurvZO variants first run ``--warmup`` steps with
   ``lr=0`` to warm up their scores; then each method takes ``--estimates`` steps with ``lr=0``.
   An estimate is read from the step itself, exactly: ``opt.last_step.record`` gives the sampled
   blocks, their pi and the projected gradient, and a probe standing in for ``opt._noise`` sees
   each block's noise z_b as the engine draws it (piece by piece), so ghat_b = (grad / pi_b) z_b and
   ||ghat - g||^2, ghat.g and ||ghat||^2 follow from z_b.g_b and ||z_b||^2 without regenerating
   anything. (The weights stay bit-identical: checked at the end of every method.)
3. The loss the optimizer evaluates. The first ``--real-check`` estimates of every method use the
   real model loss. All other steps (warm-up included) use its first-order Taylor model at the
   fixed weights, L(theta) = <theta - theta0, g>, evaluated on the actually perturbed weights.
   With central differences the two differ by O(eps^2) terms only: ``fd_dev`` (|g_fd - g_lin| /
   sd of g over z, max over the real-loss estimates) is about 1e-2, i.e. it changes the MSE by
   ~1e-4 relative. It saves the two forwards per step, so that 10 methods x (200 warm-up + 50-100
   estimates) fit in ~20 minutes on 2 free CPU cores (the committed results took 30 + 6 minutes on
   a shared machine: a full run, then one ``--merge`` run; the JSON lists both). The committed
   JSON also holds rows of variants whose options later left the engine, rejected by the
   measurements of docs/results.md (``feedback="energy"``, ``multiplier_cap``,
   ``sampling="replacement"``): they can no longer run, and ``--merge`` keeps their rows.
   Noise and sampling, which make the estimator's variance, are the engine's own either way.
   Monte-Carlo sizes: ``--estimates`` 100 for mezo, uniform-sparse, curvzo-ref and
   ``--variant-estimates`` 50 for option variants; the exact formula (4.) is the main figure and
   the Monte-Carlo mean checks it.
4. The exact variance formula (docs/curvzo-algorithm.md section 5), for Poisson sampling
       E||ghat_b||^2 = ((n_b + 2) G_b + n_b sum_{j != b} pi_j G_j) / pi_b,
       MSE = sum_b E||ghat_b||^2 - sum_b G_b,
   and for uniform k-of-m sampling (the "uniform-sparse" preset) the same with pi_j replaced by
   the joint-inclusion ratio (k - 1)/(m - 1). It is evaluated at every step's full pi vector
   (captured from ``opt.inclusion_probabilities`` as the step calls it), so "formula" is the
   exact expected MSE of the very steps the Monte-Carlo average ("mc") samples; mc/formula
   checks the engine and the formula against each other (z = (mc - formula) / SE).
5. The oracle: minimise the formula over pi (sum pi <= k, 0 < pi <= 1) with G_b from the
   backprop gradient. The formula is not convex in pi (terms pi_j / pi_b), but it is a
   posynomial, so it is convex in u = log pi (a geometric program): the damped fixed point
   pi_b = min(1, sqrt(((n_b+2) G_b + n_b T) / (G_b N + lambda))), T = sum pi G, N = sum n / pi,
   with lambda >= 0 set by bisection on the budget, converges to its global minimum (KKT residual
   reported). Blocks with G_b = 0 are left out (pi = 0; exact, since they cannot change the loss).
   Structures: (a) one block per tensor (272), (b) one block per embedding row, rows with zero
   gradient excluded, every other tensor one block; budgets 0.4 d and 0.8 d of each structure's
   blocks, plus each method's own block structure at its own mean budget.

MSE ratios are to MeZO's exact (D + 1) sum_b G_b; noise cost = sum_b pi_b n_b / D (elements drawn
per perturbation pass, relative to MeZO).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import _common as C

DEFAULT_OUT = C.RESULTS_DIR / "estimator_quality.json"
ROW = 576  # SmolLM2-135M hidden size: one embedding row


# ======================================================================================== formula
def formula_block_terms(G: np.ndarray, n: np.ndarray, pi: np.ndarray, design: str = "poisson") -> np.ndarray:
    """E||ghat_b||^2 for every block (0 where pi_b = 0, i.e. the block is never perturbed)."""
    out = np.zeros_like(G)
    m = pi > 0
    G_, n_, pi_ = G[m], n[m], pi[m]
    if design == "poisson":
        cross = float((pi_ * G_).sum()) - pi_ * G_
    elif design == "fixed":  # k of m without replacement: pi_bj / pi_b = (k - 1) / (m - 1)
        k, size = float(pi_.sum()), len(pi_)
        cross = (k - 1.0) / max(size - 1, 1) * (float(G_.sum()) - G_)
    else:
        raise ValueError(f"Invalid design: {design!r}")
    out[m] = ((n_ + 2.0) * G_ + n_ * cross) / pi_
    return out


def formula_mse(G: np.ndarray, n: np.ndarray, pi: np.ndarray, design: str = "poisson") -> float:
    """E||ghat - g||^2 (a block with pi = 0 but G > 0 adds its bias G_b)."""
    return float(formula_block_terms(G, n, pi, design).sum() - G[pi > 0].sum())


@dataclass
class OracleResult:
    pi: np.ndarray
    mse: float
    k_used: float
    lam: float
    iterations: int
    kkt_residual: float


def oracle_pi(G: np.ndarray, n: np.ndarray, k: float, *, tol: float = 1e-11, max_iter: int = 20000) -> OracleResult:
    """Minimise the Poisson formula over pi with sum(pi) <= k, 0 < pi <= 1 (G_b = 0 blocks: pi = 0)."""
    m = G > 0
    Gm, nm = G[m], n[m]
    size = int(m.sum())
    k = min(float(k), float(size))
    A = (nm + 2.0) * Gm
    log_pi = np.full(size, math.log(k / size))

    def fixed_point(log_pi: np.ndarray) -> tuple[np.ndarray, float]:
        pi = np.exp(log_pi)
        T, N = float((pi * Gm).sum()), float((nm / pi).sum())
        num, den = A + nm * T, Gm * N

        def total(lam: float) -> float:
            return float(np.minimum(1.0, np.sqrt(num / (den + lam))).sum())

        lam = 0.0
        if total(0.0) > k:
            lo, hi = 0.0, float(den.max()) or 1.0
            while total(hi) > k:
                hi *= 4.0
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if total(mid) > k else (lo, mid)
            lam = hi
        return np.minimum(1.0, np.sqrt(num / (den + lam))), lam

    it = 0
    for it in range(1, max_iter + 1):
        new, lam = fixed_point(log_pi)
        step = np.log(new) - log_pi
        log_pi = log_pi + 0.5 * step  # damped: the undamped map can oscillate
        if float(np.abs(step).max()) < tol:
            break
    pi = np.exp(log_pi)
    # KKT in u = log pi: d/du_b [F + lam sum pi] = 0 for pi_b < 1, <= 0 for pi_b = 1.
    T, N = float((pi * Gm).sum()), float((nm / pi).sum())
    grad_u = -(A + nm * T) / pi + Gm * N * pi + lam * pi
    scale = (A + nm * T) / pi
    free = pi < 1.0 - 1e-9
    resid = float(np.abs(grad_u[free] / scale[free]).max()) if free.any() else 0.0
    if (~free).any():
        resid = max(resid, float(np.maximum(grad_u[~free] / scale[~free], 0.0).max()))
    full = np.zeros_like(G)
    full[m] = pi
    return OracleResult(full, formula_mse(G, n, full), float(pi.sum()), lam, it, resid)


# ======================================================================================== methods
@dataclass(frozen=True)
class MethodSpec:
    """One estimator: a preset, option overrides, the embedding's block size, active-row restriction."""

    name: str
    preset: str
    options: tuple[tuple[str, Any], ...] = ()
    embed_block_size: int | None = None
    active_rows: bool = False
    note: str = ""
    variant: bool = True  # option variants take --variant-estimates, the named presets --estimates

    @property
    def adaptive(self) -> bool:
        return self.preset != "mezo"


METHODS: list[MethodSpec] = [
    MethodSpec("mezo", "mezo", note="dense two-point SPSA", variant=False),
    MethodSpec("uniform-sparse", "uniform-sparse", note="k of d tensors uniformly, adaptive k", variant=False),
    MethodSpec("curvzo-ref", "curvzo-ref", note="reference port: |g| feedback, no floor/mix", variant=False),
    MethodSpec("curvzo-sparse", "curvzo-sparse", note="the sparse preset (run only if it differs from curvzo-ref)", variant=False),
    MethodSpec("ref+square", "curvzo-ref", (("feedback", "square"),), note="squared feedback g^2"),
    MethodSpec("ref+pi_floor=0.05", "curvzo-ref", (("pi_floor", 0.05),), note="pi >= 0.05"),
    MethodSpec("ref+explore=0.1", "curvzo-ref", (("explore_mix", 0.1),), note="p = 0.9 p + 0.1 / d"),
    MethodSpec("ref+numel-norm", "curvzo-ref", (("normalize_by_numel", True),), note="e_b = ||z_b||^2 / (pi_b^2 n_b)"),
    MethodSpec("ref+emb-chunks", "curvzo-ref", embed_block_size=ROW * 64, note="embedding in 64-row blocks"),
    MethodSpec("ref+rows-active", "curvzo-ref", embed_block_size=ROW, active_rows=True,
               note="embedding rows as blocks; rows that cannot change the loss left out (step(active=...))"),
    MethodSpec("curvzo-sparse-harness", "curvzo-sparse", embed_block_size=ROW, active_rows=True,
               note="`curvzo train --method curvzo-sparse`: the preset (dense_below=16384) + embedding rows + active rows"),
]

#: Selectable with --methods, not run by default (time).
EXTRA_METHODS: list[MethodSpec] = [
    MethodSpec("mezo+rows-active", "mezo", embed_block_size=ROW, active_rows=True,
               note="MeZO with only the embedding rows that can change the loss (its exact MSE is the "
                    "oracle (b) 'all included' figure)"),
    MethodSpec("ref+fixed-0.4", "curvzo-ref", (("budget", 0.4),), note="fixed budget 0.4 d"),
    MethodSpec("ref+rows-active+numel", "curvzo-ref", (("normalize_by_numel", True),),
               embed_block_size=ROW, active_rows=True),
    MethodSpec("ref+rows-active+square", "curvzo-ref", (("feedback", "square"),),
               embed_block_size=ROW, active_rows=True),
    MethodSpec("ref+rows-active+floor", "curvzo-ref", (("pi_floor", 0.05),),
               embed_block_size=ROW, active_rows=True),
    # The estimator variants of benchmarks/stability, as the harness runs them (rows + active mask).
    *(MethodSpec(f"curvzo-sparse+{name}", "curvzo-sparse", options, embed_block_size=ROW, active_rows=True, note=note)
      for name, options, note in (
          ("subspace", (("correction", "subspace"),), "divisor: the expected perturbed fraction"),
          ("floor0.2", (("pi_floor", 0.2),), "pi >= 0.2 on the sampled blocks"),
          ("rademacher", (("noise", "rademacher"),), "Rademacher z"),
      )),
]


def _preset_options(preset: str) -> dict[str, Any]:
    from curvzo.optim import PRESETS

    return dict(PRESETS[preset][1])


def select_methods(names: str | None) -> list[MethodSpec]:
    specs = METHODS
    if names:
        every = METHODS + EXTRA_METHODS
        wanted = [s.strip() for s in names.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {m.name for m in every}]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {[m.name for m in every]}")
        specs = [m for m in every if m.name in wanted]
    # "curvzo-sparse" only when it differs from the reference preset.
    out = []
    for s in specs:
        if s.name == "curvzo-sparse" and _preset_options("curvzo-sparse") == _preset_options("curvzo-ref"):
            continue
        out.append(s)
    return out


# ======================================================================================== probe
class NoiseProbe:
    """Stands in for ``opt._noise``: forwards every noise segment; the first time a step reads a
    segment of a block (the +eps pass, before the engine uses z) it adds that segment's z.g and
    ||z||^2 to the block's z_b.g_b and ||z_b||^2 (later passes read the same segments again and
    are not counted)."""

    def __init__(self, inner: Any, grad_views: list[torch.Tensor]) -> None:
        self.inner = inner
        self.grad_views = grad_views
        self.measure = True
        self.seed: int | None = None
        self.touched: list[Any] = []
        self.seen: set[tuple[int, int, int]] = set()
        self.zg: dict[int, float] = {}
        self.zz: dict[int, float] = {}

    def __getattr__(self, name: str) -> Any:  # draws, buffers, and anything else the engine may read
        return getattr(self.inner, name)

    def segments(self, block: Any, step_seed: int, lo: int, hi: int) -> Any:
        if step_seed != self.seed:
            self.seed, self.touched, self.seen, self.zg, self.zz = step_seed, [], set(), {}, {}
        if block.index not in self.zg:
            self.touched.append(block)
            self.zg[block.index] = self.zz[block.index] = 0.0 if self.measure else math.nan
        for a, b, z, sign in self.inner.segments(block, step_seed, lo, hi):
            if self.measure and (block.index, a, b) not in self.seen:
                self.seen.add((block.index, a, b))
                self.zg[block.index] += sign * float(torch.dot(z, self.grad_views[block.index][a:b]))
                self.zz[block.index] += float(torch.dot(z, z))
            yield a, b, z, sign

    def fill(self, block: Any, step_seed: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        for a, b, z, sign in self.segments(block, step_seed, lo, hi):
            torch.mul(z, sign, out=out[a - lo : b - lo])
        return out


# ======================================================================================== worker
_SHARED: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    C.quiet_transformers()


def _build_optimizer(spec: MethodSpec, model: torch.nn.Module, *, eps: float, seed: int):
    from curvzo.optim import build_optimizer

    embed = model.get_input_embeddings().weight
    others = [p for p in model.parameters() if p is not embed]
    first = {"params": [embed]}
    if spec.embed_block_size is not None:
        first["block_size"] = spec.embed_block_size
    groups = [first, {"params": others}]
    return build_optimizer(spec.preset, groups, lr=0.0, eps=eps, seed=seed, weight_decay=0.0, **dict(spec.options))


def run_method(spec: MethodSpec, shared_path: str, args: dict[str, Any]) -> dict[str, Any]:
    """Warm-up and Monte-Carlo estimates of one method; returns plain data (pickled to the parent)."""
    t_start = time.perf_counter()
    torch.manual_seed(0)
    shared = torch.load(shared_path, mmap=True, weights_only=True)
    model, tokenizer = C.load_lm("smollm2-135m")
    batch = C.encode_batch(tokenizer, C.sst2_examples(args["batch_size"], seed=args["data_seed"], data_dir=args["data_dir"]), max_length=256)
    if not torch.equal(batch.input_ids, shared["input_ids"]):
        raise RuntimeError("worker batch differs from the parent's")
    params = dict(model.named_parameters())
    theta0 = {name: t for name, t in zip(shared["names"], shared["theta0"])}
    grads = {name: g for name, g in zip(shared["names"], shared["grad"])}
    for name, p in params.items():
        if not torch.equal(p.detach(), theta0[name]):
            raise RuntimeError(f"worker weights differ from the parent's at {name}")
    by_param = {id(p): name for name, p in params.items()}

    opt = _build_optimizer(spec, model, eps=args["eps"], seed=args["seed"])
    blocks = opt.blocks
    g_views = [grads[by_param[id(b.param)]].view(-1)[b.start : b.end] for b in blocks]
    t0_views = [theta0[by_param[id(b.param)]].view(-1)[b.start : b.end] for b in blocks]
    G = np.array([float(v.double().pow(2).sum()) for v in g_views])
    n = np.array([b.numel for b in blocks], dtype=np.float64)
    D = float(n.sum())
    gg = float(G.sum())

    active = None
    if spec.active_rows:
        rows = torch.unique(torch.cat([batch.input_ids[batch.attention_mask.bool()], batch.choice_ids.flatten()]))
        active = opt.rows_active(model.get_input_embeddings().weight, rows)
        leaked = float(G[~active.numpy()].sum())
        if leaked > 0:
            raise RuntimeError(f"{spec.name}: inactive blocks carry gradient energy {leaked:g} (active set is wrong)")
    active_np = np.ones(len(blocks), dtype=bool) if active is None else active.numpy()

    probe = NoiseProbe(opt._noise, g_views)
    opt._noise = probe
    scratch = torch.empty(max(b.numel for b in blocks), dtype=torch.float32)

    def linear_closure() -> torch.Tensor:
        # <theta - theta0, g> over the blocks this step perturbed (all others are bit-identical);
        # the constant L(theta0) is dropped because the engine reads the loss in fp32.
        total = 0.0
        for b in probe.touched:
            diff = torch.sub(b.view(), t0_views[b.index], out=scratch[: b.numel])
            total += float(torch.dot(diff, g_views[b.index]))
        return torch.tensor(total, dtype=torch.float64)

    def real_closure() -> torch.Tensor:
        return C.label_loss(model, batch)

    captured: list[torch.Tensor] = []
    sampling = getattr(opt, "sampling", None)
    if hasattr(opt, "inclusion_probabilities") and sampling not in ("uniform",):
        original = opt.inclusion_probabilities

        def spy(*a: Any, **k: Any) -> torch.Tensor:
            pi = original(*a, **k)
            captured.append(pi.detach().clone())
            return pi

        opt.inclusion_probabilities = spy
    design = "fixed" if sampling == "uniform" else "poisson"
    # The exact MSE formula is the Horvitz-Thompson estimator's with Gaussian z; other divisors
    # (the subspace scale) and Rademacher z are measured by Monte Carlo only.
    options = dict(spec.options)
    formula_applies = options.get("noise", "gaussian") == "gaussian" and options.get("correction", "ht") == "ht"

    def step_pi(record: Any) -> np.ndarray:
        """The full pi vector this step used."""
        ids = np.array(record.blocks, dtype=np.int64)
        rec_pi = np.array(record.pi)
        if spec.preset == "mezo":
            return active_np.astype(np.float64)
        if sampling == "uniform":
            return active_np.astype(np.float64) * float(rec_pi[0])
        for pi in reversed(captured):
            pi_np = pi.double().numpy()
            if np.allclose(pi_np[ids], rec_pi, rtol=1e-12, atol=0):
                return pi_np
        raise RuntimeError(f"{spec.name}: no captured inclusion probabilities match the step's record")

    # ------------------------------------------------------------------ warm-up (lr = 0)
    warm = args["warmup"] if spec.adaptive else 0
    probe.measure = False
    t_w = time.perf_counter()
    warm_skipped = 0
    for _ in range(warm):
        captured.clear()
        opt.step(linear_closure, active=active)
        warm_skipped += int(opt.last_step.skipped)
    warm_time = time.perf_counter() - t_w

    # ------------------------------------------------------------------ Monte-Carlo estimates
    probe.measure = True
    n_est = args["variant_estimates"] if spec.variant else args["estimates"]
    real_n = min(args["real_check"], n_est)
    rows: list[dict[str, float]] = []
    fd_checks: list[dict[str, float]] = []
    pi_first: np.ndarray | None = None
    pi_sum = np.zeros(len(blocks))
    acc = None
    if args["mean_direction"]:
        from curvzo.optim._noise import NoiseSource

        regen = NoiseSource()
        acc = [torch.zeros(b.numel) for b in blocks]
    t_mc = time.perf_counter()
    est_times = []
    skipped = 0
    for i in range(n_est):
        captured.clear()
        draws0 = probe.draws
        t_i = time.perf_counter()
        opt.step(real_closure if i < real_n else linear_closure, active=active)
        info = opt.last_step
        if info.skipped:
            skipped += 1
            continue
        rec = info.record
        pi_full = step_pi(rec)
        if pi_first is None:
            pi_first = pi_full.copy()
        pi_sum += pi_full
        ids = list(rec.blocks)
        coef = np.array([rec.grad / p for p in (rec.divisor or rec.pi)])
        zg = np.array([probe.zg[b] for b in ids])
        zz = np.array([probe.zz[b] for b in ids])
        dot = float((coef * zg).sum())
        sq = float((coef**2 * zz).sum())
        err = sq - 2.0 * dot + gg
        g_lin = float(zg.sum())
        if i < real_n:
            # Scale: the standard deviation of g over z for this sampled set, sqrt(sum_S G_b).
            sd = math.sqrt(float(G[ids].sum()))
            fd_checks.append({"g_fd": rec.grad, "g_lin": g_lin, "sd": sd, "dev_over_sd": abs(rec.grad - g_lin) / sd})
        if acc is not None:
            for b, c in zip(ids, coef):
                acc[b].add_(regen.fill(blocks[b], rec.seed, 0, blocks[b].numel, torch.empty(blocks[b].numel)), alpha=float(c))
        rows.append({
            "err": err,
            "dot_over_gg": dot / gg,
            "cos": dot / math.sqrt(max(sq, 1e-300) * gg),
            "formula": formula_mse(G, n, pi_full, design) if formula_applies else math.nan,
            "k": float(pi_full.sum()),
            "noise_expected": float((pi_full * n).sum() / D),
            "noise_realized": float(n[ids].sum() / D),
            "draws_over_D": (probe.draws - draws0) / D,
            "num_blocks": len(ids),
        })
        est_times.append(time.perf_counter() - t_i)
    mc_time = time.perf_counter() - t_mc

    # The optimizer ran with lr = 0: every weight must be bit-identical to the start.
    unchanged = all(torch.equal(p.detach(), theta0[name]) for name, p in params.items())

    err = np.array([r["err"] for r in rows])
    cos = np.array([r["cos"] for r in rows])
    dots = np.array([r["dot_over_gg"] for r in rows])
    formula_steps = np.array([r["formula"] for r in rows])
    N = len(rows)
    out: dict[str, Any] = {
        "name": spec.name,
        "spec": {**asdict(spec), "options": dict(spec.options)},
        "optimizer": type(opt).__name__,
        "preset_options": _preset_options(spec.preset),
        "design": design,
        "num_blocks": len(blocks),
        "num_active_blocks": int(active_np.sum()),
        "warmup_steps": warm,
        "warmup_skipped": warm_skipped,
        "estimates": N,
        "skipped": skipped,
        "real_closure_estimates": real_n,
        "weights_unchanged": unchanged,
        "mc_mse": float(err.mean()),
        "mc_mse_se": float(err.std(ddof=1) / math.sqrt(N)) if N > 1 else math.nan,
        "mc_mse_median": float(np.median(err)),
        "formula_mse_steps": float(formula_steps.mean()),
        "formula_mse_first": float(formula_steps[0]),
        "cos_mean": float(cos.mean()),
        "cos_se": float(cos.std(ddof=1) / math.sqrt(N)) if N > 1 else math.nan,
        "unbiasedness_mean_dot_over_gg": float(dots.mean()),
        "unbiasedness_se": float(dots.std(ddof=1) / math.sqrt(N)) if N > 1 else math.nan,
        "k_mean": float(np.mean([r["k"] for r in rows])),
        "k_fraction_mean": float(np.mean([r["k"] for r in rows]) / active_np.sum()),
        "noise_expected_mean": float(np.mean([r["noise_expected"] for r in rows])),
        "noise_realized_mean": float(np.mean([r["noise_realized"] for r in rows])),
        "draws_per_step_over_D": float(np.mean([r["draws_over_D"] for r in rows])),
        "blocks_per_step_mean": float(np.mean([r["num_blocks"] for r in rows])),
        "fd_checks": fd_checks,
        "fd_dev_over_sd_max": max((c["dev_over_sd"] for c in fd_checks), default=None),
        "G": G,
        "n": n,
        "pi_first": pi_first,
        "pi_mean": pi_sum / max(N, 1),
        "block_names": [_block_name(by_param[id(b.param)], b) for b in blocks],
        "gg": gg,
        "D": D,
        "time_s": {"warmup": warm_time, "mc": mc_time, "per_estimate_median": float(np.median(est_times)) if est_times else None,
                   "total": time.perf_counter() - t_start},
    }
    if acc is not None:
        mean_dot = sum(float(torch.dot(a, gv)) for a, gv in zip(acc, g_views)) / N
        mean_sq = sum(float(torch.dot(a, a)) for a in acc) / N**2
        out["cos_of_mean"] = mean_dot / math.sqrt(mean_sq * gg)
    return out


def _block_name(param_name: str, block: Any) -> str:
    """``name`` for a whole tensor, ``name[rows a:b]`` for a chunk of a matrix."""
    p = block.param
    if block.numel == p.numel():
        return param_name
    if p.dim() >= 2:
        row = p.numel() // p.shape[0]
        return f"{param_name}[rows {block.start // row}:{block.end // row}]"
    return f"{param_name}[{block.start}:{block.end}]"


def _run_star(job: tuple[MethodSpec, str, dict[str, Any]]) -> dict[str, Any]:
    spec, path, args = job
    try:
        return run_method(spec, path, args)
    except Exception as err:  # report, keep the other methods going
        import traceback

        return {"name": spec.name, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


# ======================================================================================== parent
def _gradient(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = C.load_lm("smollm2-135m")
    batch = C.encode_batch(tokenizer, C.sst2_examples(args.batch_size, seed=args.data_seed, data_dir=args.data_dir), max_length=256)
    model.zero_grad(set_to_none=True)
    loss = C.label_loss(model, batch)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    rows = torch.unique(torch.cat([batch.input_ids[batch.attention_mask.bool()], batch.choice_ids.flatten()]))
    return {
        "names": names,
        "theta0": [p.detach().clone() for p in model.parameters()],
        "grad": [p.grad.detach().clone() for p in model.parameters()],
        "loss": loss.item(),
        "input_ids": batch.input_ids.clone(),
        "active_rows": rows,
        "choice_ids": batch.choice_ids[0].clone(),
        "seq_len": int(batch.input_ids.shape[1]),
    }


def _structures(shared: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """(G, n, names) of (a) tensor blocks, (b) embedding rows with nonzero gradient + other tensors."""
    names, grads = shared["names"], shared["grad"]
    G = np.array([float(g.double().pow(2).sum()) for g in grads])
    n = np.array([g.numel() for g in grads], dtype=np.float64)
    emb = names.index("model.embed_tokens.weight")
    row_G = grads[emb].double().pow(2).sum(1).numpy()
    nz = np.nonzero(row_G > 0)[0]
    others = [i for i in range(len(names)) if i != emb]
    Gb = np.concatenate([row_G[nz], G[others]])
    nb = np.concatenate([np.full(len(nz), float(grads[emb].shape[1])), n[others]])
    return {
        "tensor_blocks": (G, n, names),
        "embedding_rows_active": (Gb, nb, [f"embed_row[{r}]" for r in nz] + [names[i] for i in others]),
    }


def _oracle_table(G: np.ndarray, n: np.ndarray, mezo: float, fractions: list[float]) -> list[dict[str, Any]]:
    D = float(n.sum())
    m = int((G > 0).sum())
    out = []
    for f in fractions:
        res = oracle_pi(G, n, f * m)
        uni = np.where(G > 0, min(1.0, f), 0.0)
        out.append({
            "budget_fraction": f,
            "k": f * m,
            "oracle_mse_ratio": res.mse / mezo,
            "oracle_k_used": res.k_used,
            "oracle_noise": float((res.pi * n).sum() / D),
            "oracle_lambda": res.lam,
            "oracle_iterations": res.iterations,
            "oracle_kkt_residual": res.kkt_residual,
            "uniform_poisson_mse_ratio": formula_mse(G, n, uni, "poisson") / mezo,
            "uniform_fixed_mse_ratio": formula_mse(G, n, uni, "fixed") / mezo,
            "uniform_noise": float((uni * n).sum() / D),
        })
    return out


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in result["methods"] if "error" not in m]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    names = [m["name"] for m in methods]
    x = np.arange(len(methods))
    formula = [m["formula_mse_ratio"] for m in methods]
    mc = [m["mc_mse_ratio"] for m in methods]
    se = [m["mc_mse_ratio_se"] for m in methods]
    oracle = [m["oracle_same_k_mse_ratio"] for m in methods]
    ax1.bar(x, formula, color="#4c72b0", label="formula at the method's pi (exact E)")
    ax1.errorbar(x, mc, yerr=se, fmt="o", color="black", ms=4, capsize=3, label="Monte-Carlo mean ± SE")
    ax1.scatter(x, oracle, marker="_", s=300, color="#c44e52", zorder=3, label="oracle pi, same blocks and budget")
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax1.axhline(0.7, color="#55a868", lw=0.8, ls=":", label="goal 0.7")
    ax1.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    ax1.set_yscale("log")
    lo = min(v for v in formula + mc + oracle if v and v > 0)
    ax1.set_ylim(bottom=0.5 * lo)
    ax1.set_ylabel("MSE / MeZO MSE")
    ax1.set_title("Estimator MSE at the pretrained weights (SmolLM2-135M, SST-2, batch 16)")
    ax1.legend(fontsize=7)
    ax1.grid(axis="y", alpha=0.3, which="both")

    for key, label, color in (("tensor_blocks", "oracle, tensor blocks", "#c44e52"),
                              ("embedding_rows_active", "oracle, active embedding rows", "#8172b2")):
        curve = result["oracle"][key]["sweep"]
        ax2.plot([c["oracle_noise"] for c in curve], [c["oracle_mse_ratio"] for c in curve], "-o", ms=3, color=color, label=label)
        ax2.plot([c["uniform_noise"] for c in curve], [c["uniform_fixed_mse_ratio"] for c in curve], ":", color=color, alpha=0.7,
                 label=f"uniform, {label.split(', ')[1]}")
    for m in methods:
        ax2.scatter(m["noise_expected_mean"], m["formula_mse_ratio"], s=25, zorder=3)
        ax2.annotate(m["name"], (m["noise_expected_mean"], m["formula_mse_ratio"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax2.set_yscale("log")
    ax2.set_xlabel("noise per pass, sum_b pi_b n_b / D")
    ax2.set_ylabel("MSE / MeZO MSE (formula)")
    ax2.set_title("Accuracy against noise cost")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    C.save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.estimator_quality", description=__doc__.split("\n\n")[1])
    parser.add_argument("--estimates", type=int, default=100, help="Monte-Carlo estimates of mezo, uniform-sparse, curvzo-ref (default: 100)")
    parser.add_argument("--variant-estimates", type=int, default=50, help="Monte-Carlo estimates of each option variant (default: 50)")
    parser.add_argument("--warmup", type=int, default=200, help="lr=0 warm-up steps of CurvZO scores (default: 200)")
    parser.add_argument("--real-check", type=int, default=5, help="estimates per method with the real model loss (default: 5)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(m.name for m in METHODS))
    parser.add_argument("--mean-direction", action="store_true", help="also accumulate the mean estimate (one more noise pass per step)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default: 2)")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="optimizer seed (default: 0)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the SST-2 draw (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=str(C.DEFAULT_DATA_DIR))
    parser.add_argument("--budgets", default="0.4,0.8", help="oracle budgets as fractions of each structure's blocks")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the PNG goes beside it")
    parser.add_argument("--merge", action="store_true",
                        help="merge the methods of this run into the existing --out JSON (same-named methods are replaced)")
    args = parser.parse_args(argv)

    C.quiet_transformers()
    t_start = time.perf_counter()
    specs = select_methods(args.methods)
    print(f"[estimator_quality] gradient by backprop, then {len(specs)} methods on {args.workers} workers", file=sys.stderr)
    shared = _gradient(args)
    structures = _structures(shared)
    G_t, n_t, _ = structures["tensor_blocks"]
    D = float(n_t.sum())
    gg = float(G_t.sum())
    mezo_mse = (D + 1.0) * gg

    budgets = [float(b) for b in args.budgets.split(",")]
    sweep = sorted(set(budgets) | {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0})
    oracle: dict[str, Any] = {}
    for key, (G, n, names) in structures.items():
        table = _oracle_table(G, n, mezo_mse, sweep)
        oracle[key] = {
            "blocks": int((G > 0).sum()),
            "excluded_zero_gradient_blocks": int((G == 0).sum()),
            "noise_all_included": float(n[G > 0].sum() / D),
            "mse_ratio_all_included": formula_mse(G, n, (G > 0).astype(float)) / mezo_mse,
            "budgets": [row for row in table if row["budget_fraction"] in budgets],
            "sweep": table,
        }
    emb = shared["names"].index("model.embed_tokens.weight")
    row_G = shared["grad"][emb].double().pow(2).sum(1)
    energy = {
        "embedding_share": float(G_t[emb] / gg),
        "embedding_coordinate_share": float(n_t[emb] / D),
        "norm_weights_share": float(sum(G_t[i] for i, nm in enumerate(shared["names"]) if "norm" in nm) / gg),
        "embedding_rows_nonzero": int((row_G > 0).sum()),
        "embedding_rows_active": int(shared["active_rows"].numel()),
        "verbalizer_rows_share_of_embedding": float(row_G[shared["choice_ids"]].sum() / row_G.sum()),
    }

    workdir = Path(tempfile.mkdtemp(prefix="curvzo-eq-"))
    shared_path = workdir / "shared.pt"
    torch.save({k: shared[k] for k in ("names", "theta0", "grad", "input_ids")}, shared_path)
    job_args = {
        "estimates": args.estimates, "variant_estimates": args.variant_estimates, "warmup": args.warmup, "real_check": args.real_check, "eps": args.eps,
        "seed": args.seed, "data_seed": args.data_seed, "batch_size": args.batch_size, "data_dir": args.data_dir,
        "mean_direction": args.mean_direction,
    }
    # Longest jobs first (MeZO perturbs everything; CurvZO variants add a warm-up).
    order = sorted(specs, key=lambda s: (s.preset != "mezo", s.variant))
    jobs = [(s, str(shared_path), job_args) for s in order]
    results: dict[str, dict[str, Any]] = {}
    try:
        if args.workers > 1:
            ctx = mp.get_context("spawn")
            with ctx.Pool(args.workers, initializer=_worker_init, initargs=(1,)) as pool:
                for res in pool.imap_unordered(_run_star, jobs):
                    results[res["name"]] = res
                    _progress(res, t_start)
        else:
            for job in jobs:
                res = _run_star(job)
                results[res["name"]] = res
                _progress(res, t_start)
    finally:
        shared_path.unlink(missing_ok=True)
        workdir.rmdir()

    methods_out = []
    mezo_active_mse = oracle["embedding_rows_active"]["mse_ratio_all_included"]
    for spec in specs:
        res = results[spec.name]
        if "error" in res:
            methods_out.append(res)
            continue
        G, n = res.pop("G"), res.pop("n")
        pi_first, pi_mean = res.pop("pi_first"), res.pop("pi_mean")
        block_names = res.pop("block_names")
        same_k = oracle_pi(G, n, res["k_mean"])
        res["formula_mse_ratio"] = res["formula_mse_steps"] / mezo_mse
        res["formula_first_mse_ratio"] = res["formula_mse_first"] / mezo_mse
        res["mc_mse_ratio"] = res["mc_mse"] / mezo_mse
        res["mc_mse_ratio_se"] = res["mc_mse_se"] / mezo_mse
        res["mc_over_formula"] = res["mc_mse"] / res["formula_mse_steps"]
        res["mc_z"] = (res["mc_mse"] - res["formula_mse_steps"]) / res["mc_mse_se"] if res["mc_mse_se"] else None
        res["oracle_same_k_mse_ratio"] = same_k.mse / mezo_mse
        res["oracle_same_k_noise"] = float((same_k.pi * n).sum() / D)
        res["oracle_same_k_used"] = same_k.k_used
        res["expected_cos_of_mean"] = math.sqrt(gg / (gg + res["formula_mse_steps"] / res["estimates"]))
        top = np.argsort(-pi_first)[:8]
        res["pi_first_top"] = [{"block": block_names[i], "pi": float(pi_first[i]), "G_share": float(G[i] / gg),
                                "n": int(n[i])} for i in top]
        act = pi_first > 0
        res["pi_first_summary"] = {
            "sum": float(pi_first.sum()), "min": float(pi_first[act].min()), "median": float(np.median(pi_first[act])),
            "max": float(pi_first.max()), "count_below_1e-2": int((pi_first[act] < 1e-2).sum()),
            "count_saturated": int((pi_first >= 1 - 1e-12).sum()),
        }
        # Where pi puts its mass against where the gradient energy is (embedding vs the rest).
        emb_blocks = np.array(["embed_tokens" in b for b in block_names])
        res["embedding_pi_mass"] = float(pi_mean[emb_blocks].sum())
        res["embedding_noise_share"] = float((pi_mean * n)[emb_blocks].sum() / max((pi_mean * n).sum(), 1e-300))
        methods_out.append(res)

    command = "python -m benchmarks.estimator_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = [{"command": command, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": C.git_commit(),
             "methods": [m["name"] for m in methods_out], "runtime_s": time.perf_counter() - t_start}]
    out = Path(args.out)
    if args.merge and out.exists():
        previous = json.loads(out.read_text())
        if abs(previous["batch"]["grad_norm_sq"] - gg) > 1e-9 * gg:
            raise SystemExit(f"--merge: {out} was computed on a different gradient; rerun everything")
        fresh = {m["name"] for m in methods_out}
        kept = [m for m in previous["methods"] if m["name"] not in fresh]
        rank = {m.name: i for i, m in enumerate(METHODS + EXTRA_METHODS)}
        methods_out = sorted(kept + methods_out, key=lambda m: rank.get(m["name"], len(rank)))
        runs = previous.get("runs", [{"command": previous.get("command"), "methods": [m["name"] for m in previous["methods"]],
                                      "runtime_s": previous.get("runtime_s")}]) + runs

    mezo_res = next((m for m in methods_out if m.get("name") == "mezo" and "error" not in m), None)
    ref = next((m for m in methods_out if m.get("name") == "curvzo-ref" and "error" not in m), None)
    summary = {
        "mezo_mse_formula": mezo_mse,
        "mezo_mc_over_formula": mezo_res["mc_over_formula"] if mezo_res else None,
        "curvzo_ref_formula_ratio": ref["formula_mse_ratio"] if ref else None,
        "goal_curvzo_over_mezo_mse": 0.7,
        "best_method": min((m for m in methods_out if "error" not in m and math.isfinite(m["formula_mse_ratio"] or math.nan)),
                           key=lambda m: m["formula_mse_ratio"])["name"],
        "mezo_rows_active_formula_ratio": mezo_active_mse,
    }
    result = {
        "command": command,
        "runs": runs,
        "config": vars(args),
        "environment": C.environment("cpu"),
        "model": {"name": "smollm2-135m", "params": int(D), "tensors": len(shared["names"])},
        "batch": {"size": args.batch_size, "seq_len": shared["seq_len"], "loss": shared["loss"], "grad_norm_sq": gg},
        "gradient_energy": energy,
        "oracle": oracle,
        "methods": methods_out,
        "summary": summary,
        "notes": [
            "formula_mse_ratio: exact expected MSE at each step's pi, averaged over the Monte-Carlo steps, / MeZO's (D+1) sum G.",
            "mc_mse_ratio: mean of ||ghat - g||^2 over the estimates (first real_closure_estimates with the real loss, "
            "then its first-order Taylor model), same normalisation; mc_z is (mc - formula)/SE.",
            "oracle_same_k: the formula minimised over pi for the method's own blocks at its mean budget sum(pi).",
            "noise = sum_b pi_b n_b / D per perturbation pass; the engine draws it twice per step at lr=0 (3x with an update).",
        ],
        "runtime_s": time.perf_counter() - t_start,
    }
    C.write_json(out, result)
    _plot(result, out.with_suffix(".png"))
    print(render_tables(result))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['runtime_s']:.0f} s")
    return 0


def _progress(res: dict[str, Any], t_start: float) -> None:
    if "error" in res:
        print(f"  {res['name']}: ERROR {res['error']}\n{res.get('traceback', '')}", file=sys.stderr)
    else:
        print(f"  {res['name']}: {res['estimates']} estimates, warm-up {res['time_s']['warmup']:.0f} s, "
              f"MC {res['time_s']['mc']:.0f} s (t={time.perf_counter() - t_start:.0f} s)", file=sys.stderr)


def render_tables(result: dict[str, Any]) -> str:
    lines = []
    e = result["gradient_energy"]
    lines.append(f"gradient energy: embedding {e['embedding_share']:.1%} of sum G on {e['embedding_coordinate_share']:.1%} of the "
                 f"coordinates, norms {e['norm_weights_share']:.1%}; {e['embedding_rows_nonzero']} embedding rows with nonzero "
                 f"gradient (verbalizer rows: {e['verbalizer_rows_share_of_embedding']:.1%} of the embedding's energy)")
    rows = []
    for m in result["methods"]:
        if "error" in m:
            rows.append([m["name"], "ERROR", *[None] * 11])
            continue
        rows.append([
            m["name"], m["formula_mse_ratio"], m["mc_mse_ratio"], m["mc_mse_ratio_se"], m["mc_z"],
            m["oracle_same_k_mse_ratio"], m["k_mean"], m["noise_expected_mean"], m["oracle_same_k_noise"],
            m["cos_mean"], m["unbiasedness_mean_dot_over_gg"], m["fd_dev_over_sd_max"], m["estimates"],
        ])
    lines.append("\nMSE relative to MeZO (formula: exact at the method's pi; mc: Monte-Carlo mean ± SE)")
    lines.append(C.format_table(
        ["method", "formula", "mc", "mc_se", "mc_z", "oracle@k", "E#blocks", "noise", "orc_noise", "cos", "E[ghat.g]/|g|^2", "fd_dev", "N"],
        rows))
    for key, title in (("tensor_blocks", "(a) tensor blocks"), ("embedding_rows_active", "(b) embedding rows, zero-gradient rows excluded")):
        o = result["oracle"][key]
        lines.append(f"\noracle {title}: {o['blocks']} blocks; all included: MSE {o['mse_ratio_all_included']:.3f} x MeZO, "
                     f"noise {o['noise_all_included']:.3f}")
        lines.append(C.format_table(
            ["budget", "k", "oracle", "k_used", "noise", "uniform(poisson)", "uniform(k-of-m)", "uni_noise", "kkt"],
            [[r["budget_fraction"], r["k"], r["oracle_mse_ratio"], r["oracle_k_used"], r["oracle_noise"],
              r["uniform_poisson_mse_ratio"], r["uniform_fixed_mse_ratio"], r["uniform_noise"], r["oracle_kkt_residual"]]
             for r in o["budgets"]]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
