"""DistributedZO on 2 gloo processes against one process: data, query and shard (FSDP2) modes.

The two ranks run all three modes in one spawned process group (starting processes is the slow
part) and save what they end with; the test process computes the single-process references.
Ranks and references run with the same thread count (``threads.THREADS``): a bit-identity
between runs with different counts would hold on some CPUs' kernels and not on others.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from curvzo.optim import DistributedZO, build_optimizer
from threads import THREADS, pinned_threads

STEPS = 4
BATCH = 6
WORLD = 2
NEWTON = {"newton": True, "lr": 0.1}  # the Newton step's options: lr is the fraction of the step taken


class Net(nn.Module):
    """Uneven shapes on purpose: 2-rank shards of unequal size, rows spanning two noise units."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(51, 8)
        self.body = nn.Linear(8, 2999)  # 23,992 elements: two CPU noise units of whole rows
        self.norm = nn.LayerNorm(2999)
        self.head = nn.Linear(2999, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.emb(ids).mean(1)).tanh()))


def _net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 51, (STEPS, BATCH, 3), generator=gen), torch.randn(STEPS, BATCH, 5, generator=gen)


def _optimizer(model: nn.Module, **options):
    defaults = {"lr": 1e-4, "eps": 1e-3, "seed": 3, "block_size": 4000, "dense_below": 100, "budget_every": 2}
    return build_optimizer("curvzo-sparse", model.parameters(), model=model, **{**defaults, **options})


def _loss(model: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(ids) - y) ** 2).mean()


def _loss_and_logits(model: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Newton step's closure: the cross-entropy of the head's 5 logits against y's largest entry."""
    logits = model(ids)
    return nn.functional.cross_entropy(logits, y.argmax(-1)), logits


def _train(mode: str | None, rank: int = 0, world: int = 1, queries: int | None = None, shard: bool = False,
           **options) -> dict:
    """Run STEPS steps; the result holds the full weights, the scores, the records."""
    model = _net()
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.body)
        fully_shard(model.head)
        fully_shard(model)
    opt = _optimizer(model, **options)
    zo = DistributedZO(opt, mode, queries=queries) if mode else None
    ids, ys = _data()
    loss = _loss_and_logits if opt.newton else _loss
    steps = []
    for t in range(STEPS):
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world) if mode in ("data", "shard") else slice(None)
        closure = lambda: loss(model, ids[t, share], ys[t, share])  # noqa: E731
        if zo is None:
            opt.step(closure)
            steps.append(opt.last_step)
        else:
            zo.step(closure, weight=share.stop - share.start if share.stop else 1.0)
            steps += zo.last_steps
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
    return {"weights": weights, "scores": opt.scores.clone(), "records": [s.record for s in steps],
            "curvatures": [s.curvature for s in steps], "k": opt._global_state()["k"],
            "bytes": zo.bytes_communicated if zo else 0}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(THREADS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {f"{mode}{'-newton' * newton}": _train(mode, rank, WORLD, shard=mode == "shard", **(NEWTON if newton else {}))
                   for mode in ("data", "query", "shard") for newton in (False, True)}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in weights.items():
        h.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["data", "query", "shard", "data-newton", "query-newton", "shard-newton"])
def test_weights_are_bit_identical_across_ranks(ranks, mode):
    assert _digest(ranks[0][mode]["weights"]) == _digest(ranks[1][mode]["weights"])
    assert torch.equal(ranks[0][mode]["scores"], ranks[1][mode]["scores"])


@pytest.mark.parametrize("mode", ["data", "shard", "data-newton", "shard-newton"])
def test_data_and_shard_modes_follow_one_process_on_the_global_batch(ranks, mode):
    newton = mode.endswith("-newton")
    reference = _train(None, **(NEWTON if newton else {}))
    got = ranks[0][mode]
    assert [(r.seed, r.blocks) for r in got["records"]] == [(r.seed, r.blocks) for r in reference["records"]]
    # The losses are summed in another order: g = (L+ - L-) / (2 eps) differs by ~ulp(L) / eps, and
    # the scores learnt from |g| (hence pi and the budget) by as much relatively.
    for mine, theirs in zip(got["records"], reference["records"]):
        assert mine.grad == pytest.approx(theirs.grad, abs=1e-3) and mine.pi == pytest.approx(theirs.pi, rel=1e-4)
    assert got["k"] == pytest.approx(reference["k"], rel=1e-4)
    torch.testing.assert_close(got["scores"], reference["scores"], rtol=1e-3, atol=0)
    # Each step moves a weight by lr * g * z / pi, so g's difference (up to the 1e-3 above) moves
    # it by up to lr * 1e-3 * |z| / pi = 1e-7 * |z| / pi per step: a few 1e-6 over the run.
    _close(got["weights"], reference["weights"], atol=5e-6)
    assert not torch.equal(got["weights"]["body.weight"], _net().body.weight)  # it trained
    if newton:  # the curvature of the global batch (the ranks' means weighted by their shares), to g's rounding
        assert got["curvatures"] == pytest.approx(reference["curvatures"], rel=1e-4)
        assert [r.newton for r in got["records"]] == pytest.approx([r.newton for r in reference["records"]], rel=1e-4)
    per_step = 4 if newton else 3  # L+, L-, the share's weight (and the curvature) per rank
    assert got["bytes"] == STEPS * per_step * 8 + (0 if mode.startswith("data") else
                                                   sum(8 * len(r.blocks) for r in got["records"]))


@pytest.mark.parametrize("mode", ["query", "query-newton"])
def test_query_mode_equals_one_process_taking_q_queries(ranks, mode):
    newton = mode.endswith("-newton")
    with pinned_threads():  # the ranks' count: the claim is bit-identity
        reference = _train("query", queries=WORLD, **(NEWTON if newton else {}))
    got = ranks[0][mode]
    assert _digest(got["weights"]) == _digest(reference["weights"])
    assert torch.equal(got["scores"], reference["scores"])
    assert got["records"] == reference["records"] and got["curvatures"] == reference["curvatures"]
    assert all((c is not None) == newton for c in got["curvatures"])
    assert len(got["records"]) == STEPS * WORLD and got["bytes"] == STEPS * (3 if newton else 2) * 8


# The estimator variants leave per-draw facts on the optimizer (the subspace correction's
# inclusion probabilities, the running |g| scale): a q-query step must restore each draw's before
# learning from it. A Newton step also carries each query's curvature through the exchange.
VARIANTS = [{}, {"correction": "subspace", "normalize": True}, {"feedback": "square", "explore_mix": "adaptive"}, NEWTON]
VARIANT_IDS = ["default", "subspace+normalize", "square+explore", "newton"]


@pytest.mark.parametrize("options", VARIANTS, ids=VARIANT_IDS)
def test_one_query_is_the_ordinary_step(options):
    plain, query, data = _train(None, **options), _train("query", **options), _train("data", **options)
    assert _digest(plain["weights"]) == _digest(query["weights"]) == _digest(data["weights"])
    assert plain["records"] == query["records"] == data["records"]


@pytest.mark.parametrize("options", VARIANTS, ids=VARIANT_IDS)
def test_replay_rebuilds_a_query_run(options):
    run = _train("query", queries=3, **options)
    # Each record's divisor comes from its own draw (a stale draw's would not match its blocks).
    assert all(r.divisor is None or len(r.divisor) == len(r.blocks) for r in run["records"])
    assert ("correction" not in options) or all(r.divisor is not None for r in run["records"])
    model = _net()
    zo = DistributedZO(_optimizer(model, **options), "query", queries=3)
    grads = [r.grad for r in run["records"]]
    curvatures = run["curvatures"] if zo.optimizer.newton else [None] * len(grads)
    for t in range(STEPS):
        zo.replay(grads[3 * t : 3 * t + 3], curvatures=curvatures[3 * t : 3 * t + 3] if zo.optimizer.newton else None)
    assert _digest(dict(model.state_dict())) == _digest(run["weights"])
    assert torch.equal(zo.optimizer.scores, run["scores"])


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "model"}, "Invalid mode: 'model'"),
    ({"mode": "data", "queries": 2}, "queries is a query-mode option"),
    ({"mode": "query", "queries": 0}, "Invalid queries: 0"),
    ({"mode": "shard"}, "shard mode needs the optimizer's `model`"),
])
def test_bad_inputs(kwargs, message):
    model = _net()
    opt = build_optimizer("curvzo-sparse", model.parameters(), seed=0)  # no model=
    with pytest.raises(ValueError, match=message):
        DistributedZO(opt, **kwargs)
