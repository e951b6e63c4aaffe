"""Thread counts for tests that compare runs bit for bit.

Whether two runs made with different numbers of threads give the same bits depends on the CPU's
kernels: a matmul or a reduction splits its sums by thread, and the split changes the rounding.
So a test that claims bit-identity makes both runs under the same count, set explicitly on both
sides: :func:`pinned_threads` in this process, :func:`thread_env` for a process it starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: The count every compared run uses: the one-thread-per-rank of the distributed tests, and cheap
#: for the tiny models the tests train.
THREADS = 1


@contextmanager
def pinned_threads(count: int = THREADS) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the count it found."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_env(count: int = THREADS) -> dict[str, str]:
    """This process's environment, with a child process's thread count set to ``count``."""
    return {**os.environ, "OMP_NUM_THREADS": str(count), "MKL_NUM_THREADS": str(count)}
