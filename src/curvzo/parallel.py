"""The harness on several processes: the torchrun process group, who writes, and dead ranks.

    torchrun --nproc-per-node 2 -m curvzo train --parallel data ...      # one machine, 2 processes
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m curvzo train --parallel query ...     # and the same on node 1

The launch is torchrun's (its rendezvous, its environment: ``RANK``, ``WORLD_SIZE``, ...); the
group is gloo on CPU and NCCL on GPU. Every rank runs the whole loop in lockstep (same batches,
same evaluations), the ZO step exchanges scalars (:class:`curvzo.optim.DistributedZO`), and
only rank 0 writes to the run folder, which the other ranks read (to resume, to load the best
weights): on several machines it must be on storage they all see.

Failures: a rank whose process dies breaks the next collective of every other rank, and torchrun
stops the others (SIGTERM); either way each survivor raises :class:`~curvzo.errors.RankFailed`
naming the dead rank (found among the ranks on its machine; a rank elsewhere is reported as
such), and the CLI prints it as one line. The run folder keeps its last complete checkpoint.
Collectives time out after :data:`COLLECTIVE_TIMEOUT_S` if a rank hangs rather than dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from .config import TrainConfig
from .errors import ConfigError, CurvzoError, RankFailed

__all__ = ["Ranks", "start", "shard_model", "reshard", "full_weights", "load_local", "COLLECTIVE_TIMEOUT_S"]

#: Longest wait in one collective: an evaluation plus a checkpoint of a large model fit in it.
COLLECTIVE_TIMEOUT_S = 1800

#: Config keys that need not agree across ranks (each picks its own default run folder name).
_RANK_LOCAL = frozenset({"output_dir"})


@dataclass
class Ranks:
    """This process's place in the run: ``mode`` (None: a plain single-process run), rank, size."""

    mode: str | None = None
    rank: int = 0
    world: int = 1
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of each rank
    owns_group: bool = False  # this run created the process group (and destroys it)
    previous_sigterm: Any = None  # the SIGTERM handler to restore at the end

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder, logs and plots (rank 0 only)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded: shard mode on more than one rank (one rank holds it all)."""
        return self.mode == "shard" and self.distributed

    @property
    def step_mode(self) -> str | None:
        """The DistributedZO mode: shard mode on one rank is data mode (nothing to shard)."""
        return "data" if self.mode == "shard" and not self.sharded else self.mode

    def agree(self, cfg: TrainConfig) -> TrainConfig:
        """Refuse ranks whose configs differ (each one names the keys); adopt rank 0's run folder.

        Collective: the first thing every rank does, so a mismatch stops the run before any work.
        """
        if not self.distributed:
            return cfg
        mine = {k: v for k, v in cfg.comparable().items() if k not in _RANK_LOCAL}
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (mine, cfg.output_dir, socket.gethostname(), os.getpid()))
        self.peers = [(host, pid) for _, _, host, pid in gathered]
        reference = gathered[0][0]
        for rank, (theirs, _, _, _) in enumerate(gathered[1:], start=1):
            changed = sorted(k for k in reference.keys() | theirs.keys() if reference.get(k) != theirs.get(k))
            if changed:
                detail = ", ".join(f"{k}={theirs.get(k)!r} (rank 0: {reference.get(k)!r})" for k in changed[:4])
                raise ConfigError(f"the ranks run different configs: rank {rank} has {detail}; every rank needs the same")
        return replace(cfg, output_dir=gathered[0][1])

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run a block whose input errors may strike some ranks only (a missing file on one
        machine): every rank learns of the first one, and all raise it, so none waits forever
        in a later collective. Rank 0 alone prints it (see ``cli``), prefixed by the rank that
        met it when that is another."""
        error: CurvzoError | None = None
        try:
            yield
        except CurvzoError as err:
            if not self.distributed:
                raise
            error = err
        if not self.distributed:
            return
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, None if error is None else (type(error).__name__, str(error)))
        for rank, failure in enumerate(gathered):
            if failure is not None:
                if rank == self.rank and error is not None:
                    raise error
                raise ConfigError(f"rank {rank}: {failure[1]}")

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank, for a choice that depends on its clock (a checkpoint
        due by time) and leads to collectives in shard mode (gathering the weights)."""
        if not self.sharded:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        value = torch.tensor([int(flag)], dtype=torch.uint8, device=device)
        dist.broadcast(value, src=0)
        return bool(value)

    def barrier(self) -> None:
        """Wait for every rank (e.g. for rank 0's files before the others read them)."""
        if self.distributed:
            dist.barrier()

    def same_weights(self, digest: str) -> None:
        """Refuse to go on if the ranks' weights differ (they never should; compared at each evaluation)."""
        if not self.distributed:
            return
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            raise RuntimeError(f"the ranks' weights differ (digests {', '.join(d[:12] for d in gathered)})")

    def dead(self) -> list[int]:
        """Ranks whose process is gone (or a zombie), among those on this machine."""
        here = socket.gethostname()
        gone = []
        for rank, (host, pid) in enumerate(self.peers):
            if rank == self.rank or host != here:
                continue
            try:
                status = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                gone.append(rank)
                continue
            if status.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                gone.append(rank)
        return gone

    def failure(self, cause: str) -> RankFailed:
        """The error a survivor raises: which rank died (``cause`` when none is found dead here)."""
        if self.previous_sigterm is not None:  # the launcher's stop must not cut the report short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.previous_sigterm = None
        gone = self.dead()
        if gone:
            who = ", ".join(f"rank {r} (pid {self.peers[r][1]})" for r in gone)
            return RankFailed(f"{who} died; rank {self.rank} stops too")
        remote = sorted({host for host, _ in self.peers} - {socket.gethostname()})
        where = f" (ranks on {', '.join(remote)} cannot be checked from here)" if remote else ""
        return RankFailed(f"rank {self.rank} stops: {cause}{where}")

    def close(self) -> None:
        """Leave the process group this run created and give SIGTERM back."""
        if self.previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self.previous_sigterm)
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start(cfg: TrainConfig) -> Ranks:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1).

    A ``parallel`` mode without torchrun is one process (the mode's single-process reference); a
    torchrun launch without a mode is refused, since its processes would all write one run folder.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel == "none":
        if world > 1:
            raise ConfigError(f"torchrun started {world} processes but `parallel` is none: add --parallel data, query or shard")
        return Ranks()
    if world == 1:
        return Ranks(cfg.parallel, peers=[(socket.gethostname(), os.getpid())])
    if cfg.parallel in ("data", "shard") and cfg.batch_size % world:
        raise ConfigError(f"`batch_size` {cfg.batch_size} does not split evenly over {world} processes "
                          f"(`parallel: {cfg.parallel}` gives each rank an equal share of every batch)")
    owns_group = not dist.is_initialized()
    if owns_group:
        if cfg.resolved_device().type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    ranks = Ranks(cfg.parallel, dist.get_rank(), dist.get_world_size(), owns_group=owns_group)

    def stopped(signum: int, frame: FrameType | None) -> None:
        raise ranks.failure("the launcher stopped it (SIGTERM)")

    if threading.current_thread() is threading.main_thread():  # torchrun stops the survivors of a dead rank
        ranks.previous_sigterm = signal.signal(signal.SIGTERM, stopped)
    return ranks


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 over a Hugging Face causal LM: one unit per decoder layer (the classes the model
    lists in ``_no_split_modules``), then the root (embeddings, final norm, LM head, tied or not).

    A layer's parameters are gathered just for its own forward, so a forward holds one layer's
    full weights at a time beyond the root's.
    """
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)


def reshard(model: torch.nn.Module) -> None:
    """Drop the parameters FSDP keeps gathered after a forward (the root's: embeddings, LM head),
    so that the model's parameters are the sharded ones the optimizer holds again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with sharded tensors gathered (collective: every rank calls it); a
    tensor two keys share (tied embeddings) is gathered once and shared, as ``save_pretrained``
    expects of tied weights."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            if id(tensor) not in gathered:
                gathered[id(tensor)] = tensor.full_tensor()
            out[name] = gathered[id(tensor)]
        else:
            out[name] = tensor
    return out


@torch.no_grad()
def load_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` into ``param`` (sharded or not)."""
    from torch.distributed.tensor import DTensor

    from .optim.distributed import local_shard

    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    local, lo, hi = local_shard(param)
    local.copy_(full.reshape(-1)[lo:hi])
