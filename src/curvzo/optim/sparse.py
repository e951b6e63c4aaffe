"""SparseCurvZO: the paper's adaptive curvature-guided sparse estimator (arXiv 2603.21725), kept for comparison.

Its accuracy profile rejects it against MeZO (docs/results.md); the library's flagship is
:class:`curvzo.optim.CurvZO`, whose curvature sets the step length instead of the sampled set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch

from torch import nn

from ._options import Noise, Rounding
from ._sampling import draw_multinomial, draw_poisson, draw_uniform, pps_inclusion
from ._validate import is_int, is_real
from .optimizer import DEFAULT_MAX_CHUNK, StepRecord, ZOOptimizer

__all__ = ["SparseCurvZO"]

Sampling = Literal["pps", "multinomial", "uniform"]
Feedback = Literal["abs", "square"]
Correction = Literal["ht", "subspace"]

_SAMPLINGS = get_args(Sampling)
_FEEDBACKS = get_args(Feedback)
_CORRECTIONS = get_args(Correction)


class SparseCurvZO(ZOOptimizer):
    r"""Sparse two-point ZO that learns which blocks to perturb from the scalar loss differences.

    .. math::
        \begin{aligned}
        &p_b = s_b / \textstyle\sum_j s_j \quad(\text{optionally } (1-\alpha)p_b + \alpha/d) \\
        &\pi_b = \min(1, c\,p_b),\ \textstyle\sum_b \pi_b \le k \quad(\text{Poisson PPS}) \\
        &S \sim \text{Bernoulli}(\pi),\quad g = \frac{L(\theta+\epsilon z_S)-L(\theta-\epsilon z_S)}{2\epsilon} \\
        &\theta_b \leftarrow \theta_b - \eta\,\big((g/\pi_b)\,z_b + \lambda\theta_b\big),\ b \in S \\
        &G \leftarrow 0.9G + 0.1\,\phi(g),\ r = \phi(g)/G,\ 
          w_b = \frac{\|z_b\|^2/\pi_b^2}{\sum_{j\in S}\|z_j\|^2/\pi_j^2},\ 
          s_b \leftarrow (1-\beta)s_b + \beta\,r\,w_b
        \end{aligned}

    where :math:`\phi(g) = |g|` (``feedback="abs"``, the reference port) or :math:`g^2`
    (``"square"``, the paper's diagonal-Fisher reading). Every ``budget_every`` steps the budget
    fraction f = k/d moves towards 0.1 + 0.7 (0.7 N_eff/d + 0.3 (1 - H)) of the scores'
    effective number N_eff and normalised entropy H, clipped to [0.1, 0.8].

    Args:
        params: iterable of parameters or parameter groups.
        lr (float): learning rate (default: 1e-6).
        eps (float): perturbation scale (default: 1e-3; not Adam's epsilon).
        weight_decay (float): decoupled L2 factor on sampled blocks (default: 0).
        seed (int): seed of the optimizer's generators (default: 0).
        sampling (str): ``"pps"`` Poisson probability-proportional-to-size (default),
            ``"multinomial"`` k draws without replacement (pi ~= min(1, k p)),
            or ``"uniform"`` k of d uniformly (the paper's uniform-sampling ablation).
        feedback (str): ``"abs"`` (default) or ``"square"``, see above.
        explore_mix (float | "adaptive" | None): mix alpha of the uniform distribution into p,
            re-estimated with the budget when ``"adaptive"`` (default: None, off).
        pi_floor (float): lower bound on the inclusion probability of the group's blocks (pps
            only); bounds the 1/pi correction that makes rarely sampled blocks take huge steps; a
            group option (default: 0).
        budget (float | "adaptive"): a fixed fraction of blocks, or adaptive (default).
        init_fraction (float): initial budget fraction (default: 0.4).
        budget_every (int): steps between budget updates (default: 20).
        score_beta (float): score EMA rate (default: 0.1).
        normalize_by_numel (bool): divide a block's noise energy by its size (default: False).
        block_size (int, optional): split tensors larger than this into blocks (whole rows for
            matrices). Default: one block per tensor, as the paper.
        init_score (float): initial score of every block (default: 0.01).
        dense_below (int): blocks of at most this many elements are perturbed at every step
            (pi = 1); the budget is a fraction of the other blocks (``pps`` only). Small blocks (norm
            gains, biases, embedding rows) cost nothing to perturb, while sampling them scales
            their updates by 1/pi on directions of high curvature; a group option (default: 0, none).
        rounding (str): ``"stochastic"`` keeps bf16/fp16 updates smaller than half an ulp
            (unbiased, reproducible); ``"master"`` accumulates them in fp32 master copies;
            ``"nearest"`` drops them (default: nearest).
        model (nn.Module, optional): the module the closure runs; with it perturbations are
            streamed module by module, at inference memory (default: None, see ZOOptimizer).
        max_chunk (int): largest piece perturbed, drawn or updated at once (default: 1,048,576).
        noise (str): ``"gaussian"``, ``"generated"`` or ``"rademacher"`` (default: gaussian; see ZOOptimizer).
        correction (str): what the update divides g z_b by: ``"ht"`` pi_b (Horvitz-Thompson,
            unbiased; default) or ``"subspace"`` the expected fraction of the active elements
            perturbed, the same for every sampled block (block-coordinate ZO: a biased step
            within the sampled subspace, whose size no longer depends on how rarely a block is
            drawn).
        normalize (bool): divide g by a running scale of |g| (see ZOOptimizer; default: False).
        newton (bool): the directional Newton step; the closure returns ``(loss, logits)`` and
            ``lr`` is the fraction of the step taken, about 0.1 (see ZOOptimizer; default: False).

    Example:
        >>> opt = SparseCurvZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0, model=model)
        >>> loss = opt.step(lambda: loss_fn(model(**batch)))

    .. note:: Where the paper is open (exploration mix, feedback, pi floor) the defaults here are
       the reference port's; :data:`curvzo.optim.PRESETS` names the measured alternatives.
    """

    _needs_noise_norms = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
        sampling: Sampling = "pps",
        feedback: Feedback = "abs",
        explore_mix: float | Literal["adaptive"] | None = None,
        pi_floor: float = 0.0,
        budget: float | Literal["adaptive"] = "adaptive",
        init_fraction: float = 0.4,
        budget_every: int = 20,
        score_beta: float = 0.1,
        normalize_by_numel: bool = False,
        block_size: int | None = None,
        rounding: Rounding = "nearest",
        init_score: float = 0.01,
        dense_below: int = 0,
        model: nn.Module | None = None,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        noise: Noise = "gaussian",
        correction: Correction = "ht",
        normalize: bool = False,
        newton: bool = False,
    ) -> None:
        if sampling not in _SAMPLINGS:
            raise ValueError(f"Invalid sampling: {sampling!r} (choose from {', '.join(_SAMPLINGS)})")
        if feedback not in _FEEDBACKS:
            raise ValueError(f"Invalid feedback: {feedback!r} (choose from {', '.join(_FEEDBACKS)})")
        if not (explore_mix is None or explore_mix == "adaptive" or is_real(explore_mix, lo=0.0, hi=1.0, hi_open=True)):
            raise ValueError(f"Invalid explore_mix: {explore_mix!r} (None, 'adaptive' or a float in [0, 1))")
        if not (budget == "adaptive" or (is_real(budget, lo=0.0, hi=1.0) and budget > 0)):
            raise ValueError(f"Invalid budget: {budget!r} ('adaptive' or a fraction in (0, 1])")
        if not (is_real(init_fraction, lo=0.0, hi=1.0) and init_fraction > 0):
            raise ValueError(f"Invalid init_fraction: {init_fraction!r} (a fraction in (0, 1])")
        if not is_int(budget_every, minimum=1):
            raise ValueError(f"Invalid budget_every: {budget_every!r} (an int >= 1)")
        if not (is_real(score_beta, lo=0.0, hi=1.0) and score_beta > 0):
            raise ValueError(f"Invalid score_beta: {score_beta!r} (a float in (0, 1])")
        if not (is_real(init_score) and init_score > 0):
            raise ValueError(f"Invalid init_score: {init_score!r} (a positive float)")
        if correction not in _CORRECTIONS:
            raise ValueError(f"Invalid correction: {correction!r} (choose from {', '.join(_CORRECTIONS)})")
        self.sampling = sampling
        self.feedback = feedback
        self.explore_mix = explore_mix
        self.budget = budget
        self.init_fraction = float(init_fraction)
        self.budget_every = budget_every
        self.score_beta = float(score_beta)
        self.normalize_by_numel = normalize_by_numel
        self.init_score = float(init_score)
        self.correction = correction
        self._step_active: torch.Tensor | None = None
        self._dense_for: list | None = None
        self._dense = torch.zeros(0, dtype=torch.bool)
        self._floor = torch.zeros(0, dtype=torch.float64)
        self._sizes = torch.zeros(0, dtype=torch.float64)
        super().__init__(
            params,
            {"lr": lr, "weight_decay": weight_decay, "dense_below": dense_below, "pi_floor": pi_floor},
            eps=eps, seed=seed, block_size=block_size, rounding=rounding, model=model, max_chunk=max_chunk,
            noise=noise, normalize=normalize, newton=newton,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not is_real(group["pi_floor"], lo=0.0, hi=1.0, hi_open=True):
            raise ValueError(f"Invalid pi_floor: {group['pi_floor']!r} (a float in [0, 1))")
        if not is_int(group["dense_below"], minimum=0):
            raise ValueError(f"Invalid dense_below: {group['dense_below']!r} (an int >= 0)")
        if group["pi_floor"] and self.sampling != "pps":
            raise ValueError(f"pi_floor requires sampling='pps', got sampling={self.sampling!r}")
        if group["dense_below"] and self.sampling != "pps":
            raise ValueError(f"dense_below requires sampling='pps', got sampling={self.sampling!r}")

    # ----------------------------------------------------------------- state
    def _init_global_state(self, state: dict[str, Any]) -> None:
        d = len(self.blocks)
        state["scores"] = torch.full((d,), self.init_score, dtype=torch.float64)
        state["mean_feedback"] = 1e-8
        fraction = self.init_fraction if self.budget == "adaptive" else float(self.budget)
        state["k"] = fraction * d
        state["alpha"] = 0.1 if self.explore_mix == "adaptive" else float(self.explore_mix or 0.0)

    @property
    def scores(self) -> torch.Tensor:
        """Per-block scores (float64, block-id order)."""
        return self._global_state()["scores"]

    def budget_fraction(self) -> float:
        state = self._global_state()
        return state["k"] / len(self.blocks)

    # ----------------------------------------------------------------- sampling
    def sampling_distribution(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """p_b: scores normalised (floored at 1e-12) over the active blocks, mixed with uniform."""
        state = self._global_state()
        p = state["scores"].clamp_min(1e-12)
        if active is not None:
            p = p * active
        p = p / p.sum()
        alpha = state["alpha"]
        if not alpha:
            return p
        support = torch.ones_like(p) if active is None else active.to(p.dtype)
        return (1.0 - alpha) * p + alpha * support / support.sum()

    def inclusion_probabilities(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """pi_b of every block for the next step (0 outside ``active``); pps draws with exactly these."""
        self._refresh_block_options()
        if not bool(self._dense.any()):
            return self._sparse_inclusion(active)
        dense = self._dense_blocks(active)
        drawable = self._drawable(active)
        if not bool(drawable.any()):
            return dense.double()
        return torch.where(dense, torch.ones(len(self.blocks), dtype=torch.float64), self._sparse_inclusion(drawable))

    def _sparse_inclusion(self, active: torch.Tensor | None) -> torch.Tensor:
        """pi over the blocks that are sampled, with the budget a fraction of their number."""
        k = self._k_int(active)
        if self.sampling == "uniform":
            support = torch.ones(len(self.blocks), dtype=torch.float64) if active is None else active.double()
            return support * k / support.sum()
        p = self.sampling_distribution(active)
        if self.sampling == "multinomial":
            return torch.clamp(k * p, max=1.0)
        pi = pps_inclusion(p, k)
        floor = self._floor if active is None else self._floor * active
        return torch.maximum(pi, floor) if bool(floor.any()) else pi

    def _refresh_block_options(self) -> None:
        """Per-block ``dense_below``, ``pi_floor`` and sizes from the groups (rebuilt with the blocks)."""
        if self._dense_for is self.blocks:
            return
        groups = self.param_groups
        self._dense = torch.tensor([b.numel <= groups[b.group]["dense_below"] for b in self.blocks], dtype=torch.bool)
        self._floor = torch.tensor([float(groups[b.group]["pi_floor"]) for b in self.blocks], dtype=torch.float64)
        self._sizes = torch.tensor([b.numel for b in self.blocks], dtype=torch.float64)
        self._dense_for = self.blocks

    def _dense_blocks(self, active: torch.Tensor | None) -> torch.Tensor:
        """Blocks always perturbed (``dense_below``), among the active ones."""
        self._refresh_block_options()
        return self._dense if active is None else self._dense & active

    def _drawable(self, active: torch.Tensor | None) -> torch.Tensor | None:
        """The blocks the budget is a fraction of: the active ones, less those always perturbed."""
        self._refresh_block_options()
        if not bool(self._dense.any()):
            return active
        sampled = ~self._dense_blocks(None)
        return sampled if active is None else active & sampled

    def _k_int(self, active: torch.Tensor | None) -> int:
        """Blocks to draw: the budget fraction of the blocks that can be drawn."""
        d = len(self.blocks)
        n = d if active is None else int(active.sum())
        return min(max(int(math.floor(self._global_state()["k"] * n / d)), 1), n)

    def _sample(self, state: dict[str, Any], active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.budget == "adaptive" and state["step"] % self.budget_every == 0:
            self._update_budget(state, self._drawable(active))
        self._step_pi = self.inclusion_probabilities(active)  # the subspace correction needs every pi_b
        self._step_active = active
        if self.sampling == "uniform":
            candidates = torch.arange(len(self.blocks)) if active is None else active.nonzero().flatten()
            return draw_uniform(candidates, self._k_int(active), self._sampler)
        if self.sampling == "multinomial":
            ids, pi = draw_multinomial(self.sampling_distribution(active), self._k_int(active), self._sampler)
            return ids, pi[ids]
        ids = draw_poisson(self._step_pi, self._sampler)
        return ids, self._step_pi[ids]

    def _correction(self, pi: torch.Tensor) -> torch.Tensor:
        if self.correction == "subspace":
            return torch.full_like(pi, self._perturbed_fraction())
        return pi

    def _perturbed_fraction(self) -> float:
        """Expected share of the active elements a step perturbs: sum pi_b n_b / sum n_b."""
        self._refresh_block_options()
        sizes = self._sizes
        if self._step_active is not None:
            sizes = sizes * self._step_active
        return float((self._step_pi * sizes).sum() / sizes.sum())

    def _update_budget(self, state: dict[str, Any], active: torch.Tensor | None) -> None:
        """Move k towards the share of blocks the scores say matter (more when they are flat).

        The statistics are taken over the blocks that can be drawn: inactive blocks (e.g. rows of
        tokens absent from the batch) keep their initial score and would make the scores look flat.
        """
        d = len(self.blocks)
        scores = state["scores"] if active is None else state["scores"][active]
        if scores.numel() == 0:
            return  # every active block is always perturbed: nothing to budget
        v = scores / scores.mean()
        n = v.numel()
        n_eff = float(v.sqrt().sum() ** 2 / v.sum())
        q = v / v.sum()
        entropy = float(-(q * q.clamp_min(1e-300).log()).sum() / math.log(n)) if n > 1 else 1.0
        f_raw = 0.1 + 0.7 * (0.7 * n_eff / n + 0.3 * (1.0 - entropy))
        state["k"] = min(max(0.9 * state["k"] + 0.1 * d * f_raw, 0.1 * d), 0.8 * d)
        if self.explore_mix == "adaptive":
            state["alpha"] = min(max(min(1.0 - entropy, 1.0 - d * 1e-4 / state["k"]), 0.05), 0.5)

    # ----------------------------------------------------------------- learning from the step
    def _observe(self, state: dict[str, Any], record: StepRecord, sq_norms: torch.Tensor) -> None:
        g = record.grad
        phi = abs(g) if self.feedback == "abs" else g * g
        state["mean_feedback"] = 0.9 * state["mean_feedback"] + 0.1 * phi
        r = phi / (state["mean_feedback"] + 1e-12)
        ids = torch.tensor(record.blocks, dtype=torch.long)
        energy = sq_norms / torch.tensor(record.pi, dtype=torch.float64) ** 2
        if self.normalize_by_numel:
            energy = energy / torch.tensor([self.blocks[i].numel for i in record.blocks], dtype=torch.float64)
        weights = energy / energy.sum()
        scores = state["scores"]
        scores[ids] = (1.0 - self.score_beta) * scores[ids] + self.score_beta * r * weights

