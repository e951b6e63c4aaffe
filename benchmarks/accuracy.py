"""python -m benchmarks.accuracy [--profile quick|cpu|gpu|paper] [--only task=sst2,method=mezo] [--jobs N]

The accuracy benchmark: MeZO, the `curvzo` Newton step (profile `newton`), the sparse estimator's
presets and first-order AdamW on real tasks, from the grid ``benchmarks/grids/cpu.yaml``. Identical to
``curvzo bench ...`` (the grid runner is :mod:`curvzo.bench`); run from the repository root:

    python -m benchmarks.accuracy --profile quick     # < 30 min on 2 CPU cores
    python -m benchmarks.accuracy --jobs 2            # profile cpu: the README table, ~4.5 h on 2 cores, resumable
    python -m benchmarks.accuracy --aggregate-only    # accuracy.json / accuracy.md / figures from finished runs
    python -m benchmarks.accuracy --profile gpu --jobs 12   # 300 steps, on one GPU (~40-60 min on an H200)

Outputs in ``benchmarks/results/`` (the profile's ``out``): ``runs/<task>/<method>-<mode>-lr<lr>-s<seed>/``
while a run runs, ``runs.tar.gz`` (finished runs' records, packed by the grid's ``pack: true``), ``accuracy.json``, ``accuracy.md``, ``accuracy_<task>.png``, ``forward_ratio.png``,
``<method>_budget.png`` and ``<method>_scores.png`` (the compared method's, when it samples blocks).
"""

from __future__ import annotations

import sys

from curvzo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
