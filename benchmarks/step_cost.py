"""python -m benchmarks.step_cost

Wall-clock time and peak memory of one zeroth-order training step, against the forwards it is
made of and against the peer library ``mezo`` (PyPI ``mezo==0.0.1``), on SmolLM2-135M in fp32 with
a batch of 16 real SST-2 prompts padded/truncated to 32 tokens (defaults reproduce
``benchmarks/results/step_cost.json`` and ``.png``).

Measured round-robin: ``--repeats`` rounds, each timing every measurement once (the sampled,
CurvZO-type methods ``--sparse-per-round`` times, since each step draws a random set), so that
load from other processes hits all measurements alike; medians are reported, and ratios also as
the median of within-round ratios. Untimed warm-up first (CurvZO-type methods take
``--curvzo-warmup`` steps, so that their scores and budget have left the initial uniform state):

* ``full_forward``: ``model(input_ids, attention_mask)`` with vocabulary logits;
* ``body_forward``: the decoder stack only (``model.get_decoder()``), no LM head;
* ``label_loss``: :func:`curvzo.scoring.classification_loss`, the closure of every step below
  (body forward + the two verbalizer rows of the LM head);
* steps, all with the same closure, ``lr=1e-6``, ``eps=1e-3``, on the streaming engine
  (``model=`` given): ``peer-mezo`` (``mezo.update``), every ZO preset (``mezo``, ``curvzo``: the
  Newton step, whose closure also returns the choice logits that its Gauss-Newton curvature is
  read from, ``curvzo-ref``, ``curvzo-sparse``, ``uniform-sparse``, ``curvzo-fixed``),
  ``mezo-rademacher`` (MeZO with random-sign noise), ``curvzo-sparse+rows-active`` (preset
  "curvzo-sparse" as the harness runs it: embedding rows as blocks,
  ``step(active=...)`` restricted to the rows of the batch's tokens and the two verbalizer tokens)
  and ``adamw`` (first-order: backward + ``torch.optim.AdamW``, for its memory).

Peak memory: one fresh subprocess per measurement; the model and batch are loaded, every weight
is paged in (read once) and one label-only forward runs, the peak is reset (Linux ``/proc/self/clear_refs``; on CUDA
``torch.cuda.reset_peak_memory_stats``), the work runs (3 forwards, or ``--memory-steps`` steps),
and the peak resident set size (CUDA: max allocated) is read. Ratios are to inference with the same
label-only forward ("inf_label") and with full logits ("inf_full"). The same process then runs one
more step under a dispatch mode that records the largest tensor any op allocates (forwards
included; views and in-place results allocate nothing): the step's largest transient.

Noise: elements drawn per step / parameters, from ``opt._noise.draws`` (the peer draws 4 full
passes: +eps, -2eps, +eps, update).

GPU: ``--device cuda [--dtype bfloat16] [--config opt-1.3b|llama-1b]`` (random-initialised models
of real shapes, random tokens); the same script, not run here.
"""

from __future__ import annotations

import argparse
import gc
import os
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

DEFAULT_OUT = C.RESULTS_DIR / "step_cost.json"
ZO_STEPS = ("mezo", "mezo-rademacher", "curvzo", "mezo-fallback", "curvzo-ref", "curvzo-sparse", "uniform-sparse",
            "curvzo-fixed", "curvzo-sparse+rows-active")
STEP_METHODS = ("peer-mezo", *ZO_STEPS, "adamw")
SPARSE = ("curvzo-ref", "curvzo-sparse", "uniform-sparse", "curvzo-fixed", "curvzo-sparse+rows-active")
#: Methods whose step is also measured with the full-logits closure (timings and memory under
#: ``FULL + method``): every ZO method.
FULL = "full:"
FULL_METHODS = ZO_STEPS
#: The targets, CPU fp32 (GPU bf16 in GPU_GOALS): step time over two inference forwards of the
#: same closure (the worse of the two closures), peak memory over inference with the same closure
#: (every ZO method, both closures), the ZO peak over first-order AdamW's, and curvzo's step over
#: the peer's.
GOALS = {"curvzo_step_over_2_closure": 1.3, "mezo_step_over_2_closure": 1.4, "zo_memory_over_inference_max": 1.05,
         "zo_memory_over_adamw": 0.4, "curvzo_step_over_peer": 0.3}
GPU_GOALS = {"curvzo_step_over_2_closure": 1.1, "mezo_step_over_2_closure": 1.15, "zo_memory_over_inference_max": 1.10,
             "zo_memory_over_adamw": 0.25, "curvzo_step_over_peer": 0.3}


def _import_peer():
    try:
        return importlib.import_module("mezo")
    except ImportError:
        raise SystemExit(
            "benchmarks.step_cost needs the peer library `mezo`: pip install --no-deps mezo==0.0.1 "
            "(it is a benchmark comparison, not a curvzo dependency)"
        ) from None


# ---------------------------------------------------------------------------------------- setup
def setup(args: argparse.Namespace):
    """(model, batch) for the configured model, device and dtype."""
    model, tokenizer = C.load_lm(args.config, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        batch = C.random_batch(model, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    else:
        examples = C.sst2_examples(args.batch_size, seed=args.data_seed, data_dir=args.data_dir)
        batch = C.encode_batch(tokenizer, examples, max_length=args.seq_len, pad_to=args.seq_len, device=args.device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, batch


def active_rows(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Embedding rows that can change the label-only loss: tokens in the batch and the choice tokens."""
    return torch.unique(torch.cat([batch.input_ids[batch.attention_mask.bool()], batch.choice_ids.flatten()])).cpu()


def full_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The loss a Hugging Face user writes: ``model(...)`` with vocabulary logits at every position,
    log-softmax over the vocabulary, cross-entropy of the gold choice at the answer position."""
    import torch.nn.functional as F

    from curvzo.scoring import full_logits_scores

    return F.cross_entropy(full_logits_scores(model, batch), batch.targets)


def newton_closure(loss_fn: Any, model: torch.nn.Module, batch: Any) -> Any:
    """The Newton step's closure for a measurement's loss: (loss, the choice scores it is the
    cross-entropy of), from the label-only head or from the full logits."""
    import torch.nn.functional as F

    from curvzo.scoring import classification_logits, full_logits_scores

    scores = full_logits_scores if loss_fn is full_loss else classification_logits

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        logits = scores(model, batch)
        return F.cross_entropy(logits, batch.targets), logits

    return closure


def closure_of(name: str) -> tuple[str, Any]:
    """(method, loss function) of a measurement name: ``full:<method>`` uses :func:`full_loss`."""
    if name.startswith(FULL):
        return name[len(FULL):], full_loss
    return name, C.label_loss


def make_step(name: str, model: torch.nn.Module, batch: Any, args: argparse.Namespace):
    """(step function, optimizer or None) for one step measurement: the label-only loss as the
    closure, or the full-logits loss for ``full:<method>``."""
    import warnings

    from curvzo.optim import NEWTON_FRACTION, FallbackWarning, build_optimizer, takes_newton_step

    method, loss_fn = closure_of(name)

    def closure() -> torch.Tensor:
        return loss_fn(model, batch)

    engine = {"lr": args.lr, "eps": args.eps, "seed": args.seed, "model": model, "rounding": args.rounding}
    if method == "mezo-fallback":  # MeZO the torch.optim way, without model=: the set-aside fallback
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            opt = build_optimizer("mezo", model.parameters(), **{**engine, "model": None})
        return (lambda: opt.step(closure)), opt
    if method == "adamw":
        adamw = torch.optim.AdamW(model.parameters(), lr=args.lr)

        def adamw_step() -> Any:
            loss = loss_fn(model, batch)
            loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            return loss

        return adamw_step, None
    if method == "mezo-rademacher":
        opt = build_optimizer("mezo", model.parameters(), noise="rademacher", **engine)
        return (lambda: opt.step(closure)), opt
    if takes_newton_step(method, {}):  # lr: the default fraction of the Newton step
        opt = build_optimizer(method, model.parameters(), **{**engine, "lr": NEWTON_FRACTION})
        return (lambda: opt.step(newton_closure(loss_fn, model, batch))), opt
    if method == "peer-mezo":
        peer = _import_peer()
        counter = iter(range(10**9))

        def peer_step() -> Any:
            return peer.update(model, batch, lambda m, b: loss_fn(m, b), args.eps, args.lr, 1000 + next(counter))

        return peer_step, None
    if method == "curvzo-sparse+rows-active":
        embed = model.get_input_embeddings().weight
        groups = [{"params": [embed], "block_size": embed.shape[1]}, {"params": [p for p in model.parameters() if p is not embed]}]
        opt = build_optimizer("curvzo-sparse", groups, **engine)
        mask = opt.rows_active(embed, active_rows(model, batch))
        return (lambda: opt.step(closure, active=mask)), opt
    opt = build_optimizer(method, model.parameters(), **engine)
    return (lambda: opt.step(closure)), opt


# ---------------------------------------------------------------------------------------- timing
def time_all(model: torch.nn.Module, batch: Any, methods: list[str], args: argparse.Namespace, D: int) -> dict[str, Any]:
    """Median seconds of every forward and step, measured round-robin.

    Each round times every measurement once (sampled methods ``--sparse-per-round`` times), so
    that load from other processes on a shared machine hits all of them alike and the ratios
    (taken within each round as well as of the medians) stay meaningful.
    """
    body = C.body(model)

    def full() -> Any:
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def body_only() -> Any:
        with torch.no_grad():
            return body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def label() -> Any:
        with torch.no_grad():
            return C.label_loss(model, batch)

    def full_closure() -> Any:
        with torch.no_grad():
            return full_loss(model, batch)

    calls: dict[str, tuple[Any, Any]] = {"full_forward": (full, None), "body_forward": (body_only, None),
                                         "label_loss": (label, None), "full_loss": (full_closure, None)}
    for method in methods:
        calls[method] = make_step(method, model, batch, args)
    for name, (fn, _) in calls.items():  # warm-up (sampled methods: let scores and budget move)
        for _ in range(args.curvzo_warmup if closure_of(name)[0] in SPARSE else args.warmup):
            fn()
    C.synchronize(args.device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    draws: dict[str, list[float]] = {name: [] for name in calls}
    generated: dict[str, list[float]] = {name: [] for name in calls}
    blocks: dict[str, list[int]] = {name: [] for name in calls}
    budgets: dict[str, list[float]] = {name: [] for name in calls}
    loads = []
    for _ in range(args.repeats):
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        for name, (fn, opt) in calls.items():
            for _ in range(args.sparse_per_round if closure_of(name)[0] in SPARSE else 1):
                d0 = opt._noise.draws if opt is not None else 0
                g0 = opt._noise.generated if opt is not None else 0
                start = time.perf_counter()
                fn()
                C.synchronize(args.device)
                times[name].append(time.perf_counter() - start)
                if opt is not None:
                    draws[name].append((opt._noise.draws - d0) / D)
                    generated[name].append((opt._noise.generated - g0) / D)
                    blocks[name].append(opt.last_step.num_blocks)
                    budgets[name].append(opt.last_step.budget)
    out: dict[str, Any] = {}
    for name, (_, opt) in calls.items():
        res = C.summarize(times[name])
        res["mean"] = sum(times[name]) / len(times[name])
        if opt is not None:
            res["noise_draws_over_params"] = sum(draws[name]) / len(draws[name])
            res["generated_over_params"] = sum(generated[name]) / len(generated[name])
            res["noise_draws_per_step"] = [round(x, 4) for x in draws[name]]
            res["blocks_per_step_mean"] = sum(blocks[name]) / len(blocks[name])
            res["num_blocks"] = len(opt.blocks)
            res["budget_fraction_mean"] = sum(budgets[name]) / len(budgets[name])
        elif name == "peer-mezo":
            res["noise_draws_over_params"] = 4.0  # mezo.update: randn over every parameter 4 times
            res["generated_over_params"] = 4.0
        out[name] = res
    out["_loadavg_per_round"] = loads
    # Within-round ratios: robust to slow drifts of machine load.
    per_round = args.sparse_per_round
    out["_per_round"] = {
        name: [sum(times[name][r * per_round:(r + 1) * per_round]) / per_round if closure_of(name)[0] in SPARSE else times[name][r]
               for r in range(args.repeats)]
        for name in calls
    }
    return out


# ---------------------------------------------------------------------------------------- memory
def memory_probe(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside a fresh interpreter: peak memory of one kind of work after the model is loaded."""
    model, batch = setup(args)
    work: Any
    if kind == "inference-label":
        def work() -> None:
            with torch.no_grad():
                C.label_loss(model, batch)
        reps = 3
    elif kind == "inference-full":
        def work() -> None:
            with torch.no_grad():
                full_loss(model, batch)
        reps = 3
    else:
        work, _ = make_step(kind, model, batch, args)
        reps = args.memory_steps
    # Page every weight in first (safetensors loads them as a lazy private mapping), so that the
    # window measures the work and not first-touch residency of the model: a label-only forward
    # reads a few rows of the tied LM head, a ZO update writes all of them, and counting that as
    # the step's memory would charge training for loading the 108 MiB embedding table.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        C.label_loss(model, batch)
    gc.collect()
    baseline = C.current_memory_bytes(args.device)
    ok = C.reset_peak_memory(args.device)
    for _ in range(reps):
        work()
    peak = C.peak_memory_bytes(args.device)
    with C.LargestAllocation() as seen:
        work()
    return {"kind": kind, "peak_bytes": peak, "baseline_bytes": baseline, "extra_bytes": peak - baseline, "reset_ok": ok,
            "reps": reps, "largest_allocation_bytes": seen.largest_bytes, "largest_allocation_op": str(seen.op)}


def measure_memory(kinds: list[str], argv_common: list[str]) -> dict[str, Any]:
    out = {}
    for kind in kinds:
        res = C.run_json_subprocess(["benchmarks.step_cost", *argv_common, "--memory-probe", kind], timeout=900)
        out[kind] = res
        print(f"  memory {kind}: peak {res['peak_bytes'] / 2**20:.0f} MiB (baseline {res['baseline_bytes'] / 2**20:.0f} MiB)", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------- report
def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["timings"]
    forwards = [n for n in ("full_forward", "body_forward", "label_loss", "full_loss") if n in t]
    names = [*forwards, *[n for n in t if n not in forwards]]
    values = [t[n]["median"] for n in names]
    colors = ["#8c8c8c"] * len(forwards) + ["#c44e52" if n == "peer-mezo" else "#dd8452" if n.startswith(FULL) else "#4c72b0"
                                            for n in names[len(forwards):]]
    mem = result.get("memory") or {}
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(13 if mem else 7.5, 4.6), squeeze=False)
    ax = axes[0][0]
    bars = ax.bar(range(len(names)), values, color=colors)
    two_body = 2 * t["body_forward"]["median"]
    ax.axhline(two_body, color="black", ls="--", lw=0.8, label=f"2 x body forward ({two_body:.2f} s)")
    two_label = 2 * t["label_loss"]["median"]
    ax.axhline(GOALS["curvzo_step_over_2_closure"] * two_label, color="#55a868", ls=":", lw=0.9,
               label=f"goal: curvzo <= {GOALS['curvzo_step_over_2_closure']} x (2 label-only closures)")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds (median)")
    cfg = result["config"]
    ax.set_title(f"{cfg['config']} {cfg['dtype']} on {cfg['device']}, batch {cfg['batch_size']} x {cfg['seq_len']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if mem:
        ax2 = axes[0][1]
        kinds = list(mem)
        peaks = [mem[k]["peak_bytes"] / 2**20 for k in kinds]
        ax2.bar(range(len(kinds)), peaks, color=["#8c8c8c" if k.startswith("inference") else "#dd8452" if k.startswith(FULL)
                                                 else "#4c72b0" for k in kinds])
        ref = mem["inference-label"]["peak_bytes"] / 2**20
        ax2.axhline(ref * 1.05, color="#55a868", ls=":", lw=0.9, label="goal: 1.05 x label-only inference")
        for i, v in enumerate(peaks):
            ax2.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax2.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        ax2.set_ylabel("peak memory, MiB" + (" (RSS)" if cfg["device"] == "cpu" else " (CUDA allocated)"))
        ax2.set_title("Peak memory per measurement (fresh process each)", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    C.save_figure(fig, path, dpi=110)
    plt.close(fig)


def inference_of(name: str) -> str:
    """The memory probe of inference with the closure of measurement ``name``."""
    return "inference-full" if name.startswith(FULL) or name == "full_loss" else "inference-label"


def forward_of(name: str) -> str:
    """The timed inference forward of the closure of measurement ``name``."""
    return "full_loss" if name.startswith(FULL) else "label_loss"


def is_step(name: str) -> bool:
    return closure_of(name)[0] in STEP_METHODS


def render_table(result: dict[str, Any]) -> str:
    t = result["timings"]
    two_body = 2 * t["body_forward"]["median"]
    peer = t.get("peer-mezo", {}).get("median")
    mem = result.get("memory") or {}
    rows = []
    for name in t:
        r = t[name]
        step = is_step(name)
        closure = t.get(forward_of(name), {}).get("median")
        m = mem.get({"label_loss": "inference-label", "full_loss": "inference-full"}.get(name, name), {})
        inference = mem.get(inference_of(name), {}).get("peak_bytes")
        peak = m.get("peak_bytes")
        rows.append([
            name, r["median"], r["min"], r["repeats"],
            r["median"] / (2 * closure) if step and closure else None,
            r["median"] / two_body if step else None,
            r["median"] / peer if peer and step else None,
            r.get("noise_draws_over_params"), r.get("generated_over_params"),
            peak / 2**20 if peak else None,
            peak / inference if peak and inference else None,
            m["largest_allocation_bytes"] / 2**20 if m.get("largest_allocation_bytes") else None,
        ])
    table = C.format_table(
        ["measurement", "median_s", "min_s", "n", "/(2 closure)", "/(2 body)", "/peer", "passes/D", "generated/D",
         "peak_MiB", "/inference", "largest_MiB"], rows)
    goals = "\n".join(f"goal {k}: {v['value']:.3g} (<= {v['goal']}) {'met' if v['met'] else 'NOT met'}"
                      for k, v in result["goals"].items() if v["value"] is not None)
    return table + "\n\n" + goals


#: README row labels, in the README's row order (the forwards first, then the steps).
README_LABELS = {
    "body_forward": "body forward",
    "label_loss": "label-only inference (the closure)",
    "full_loss": "full-logits inference (the closure)",
    "peer-mezo": "peer `mezo==0.0.1`",
    "mezo": "`mezo`",
    "mezo-rademacher": '`mezo`, `noise="rademacher"`',
    "curvzo": "`curvzo`: the Newton step (closure returns the choice logits too)",
    "mezo-fallback": "`mezo` without `model=` (set-aside fallback)",
    "curvzo-ref": "`curvzo-ref` (reference)",
    "curvzo-sparse": "`curvzo-sparse`, tensor blocks",
    "curvzo-sparse+rows-active": "`curvzo-sparse` as the harness runs it (embedding rows, active mask)",
    "uniform-sparse": "`uniform-sparse`",
    "curvzo-fixed": "`curvzo-fixed`",
    "adamw": "first-order AdamW (backprop)",
}


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def _readme_names(t: dict[str, Any]) -> list[tuple[str, str]]:
    """(measurement, row label) in README order: the forwards, the label-only closure's steps,
    then the full-logits closure's."""
    names = [(n, label) for n, label in README_LABELS.items() if n in t]
    steps = [(n, label) for n, label in names if is_step(n)]
    full = [(FULL + n, f"{label}, full logits") for n, label in steps if FULL + n in t]
    return names + full


def readme_table(result: dict[str, Any]) -> str:
    """The README's markdown table of a result: time, its ratios to two inference forwards of the
    same closure and to two body forwards, peak memory over inference with the same closure, the
    largest transient, passes over the weights (noise elements read / parameters) and random
    numbers generated per parameter.

    The largest-tensor column is left out for results measured without the allocation probe;
    results from before the generated-numbers count show their draws as generated."""
    t, memory = result["timings"], result.get("memory") or {}
    two_body = 2 * t["body_forward"]["median"]
    probed = any("largest_allocation_bytes" in m for m in memory.values())
    head = ["", "step time", "step / (2 x closure inference)", "step / (2 x body forward)",
            "peak memory / closure inference", *(["largest tensor a step allocates"] if probed else []),
            "passes over weights / step", "random numbers per step / params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in _readme_names(t):
        r = t[name]
        step = is_step(name)
        mem = memory.get({"label_loss": "inference-label", "full_loss": "inference-full"}.get(name, name), {})
        peak, inference = mem.get("peak_bytes"), memory.get(inference_of(name), {}).get("peak_bytes")
        ratio = "" if peak is None or inference is None else f"{peak / inference:.2f}"
        if name in ("label_loss", "full_loss") and peak is not None:
            ratio += f" ({peak / 2**20:.0f} MiB)"
        closure = t.get(forward_of(name), {}).get("median")
        largest = mem.get("largest_allocation_bytes")
        draws = r.get("noise_draws_over_params")
        generated = r.get("generated_over_params", draws)
        cells = [label, _duration(r["median"]), f"{r['median'] / (2 * closure):.2f}" if step and closure else "",
                 f"{r['median'] / two_body:.2f}" if step else "",
                 ratio, *([f"{largest / 2**20:.1f} MiB" if largest else ""] if probed else []),
                 f"{draws:.2f}" if draws else "", f"{generated:.2f}" if generated is not None and draws else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compute_goals(timings: dict[str, Any], memory: dict[str, Any] | None) -> dict[str, float | None]:
    """The target figures: step ratios to the same closure's inference (the worse closure), the
    largest ZO peak over its closure's inference, the ZO peak over AdamW's, curvzo over the peer."""

    def worst_step(method: str) -> float | None:
        ratios = [timings[n]["median"] / (2 * timings[forward_of(n)]["median"]) for n in (method, FULL + method)
                  if n in timings and forward_of(n) in timings]
        return max(ratios) if ratios else None

    zo = [n for n in timings if closure_of(n)[0] in ZO_STEPS and closure_of(n)[0] != "mezo-fallback"]
    zo_ratios = [memory[n]["peak_bytes"] / memory[inference_of(n)]["peak_bytes"] for n in zo
                 if memory and n in memory and inference_of(n) in memory]
    zo_peaks = [memory[n]["peak_bytes"] for n in zo if memory and n in memory]
    adamw = memory["adamw"]["peak_bytes"] if memory and "adamw" in memory else None
    curvzo, peer = timings.get("curvzo", {}).get("median"), timings.get("peer-mezo", {}).get("median")
    return {
        "curvzo_step_over_2_closure": worst_step("curvzo"),
        "mezo_step_over_2_closure": worst_step("mezo"),
        "zo_memory_over_inference_max": max(zo_ratios) if zo_ratios else None,
        "zo_memory_over_adamw": max(zo_peaks) / adamw if zo_peaks and adamw else None,
        "curvzo_step_over_peer": curvzo / peer if curvzo and peer else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", default="smollm2-135m", choices=["smollm2-135m", *C.ARCH_CONFIGS])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(C.DTYPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; each times every measurement once (default: 7)")
    parser.add_argument("--sparse-per-round", type=int, default=2, help="timed steps per round of sampled (CurvZO-type) methods (default: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default: 1)")
    parser.add_argument("--curvzo-warmup", type=int, default=20, help="untimed steps of CurvZO-type methods (default: 20)")
    parser.add_argument("--memory-steps", type=int, default=5, help="steps inside each memory probe (default: 5)")
    parser.add_argument("--methods", default=",".join(STEP_METHODS), help="comma-separated step methods (label-only closure)")
    parser.add_argument("--full-methods", default=",".join(FULL_METHODS),
                        help="comma-separated step methods also measured with the full-logits closure ('' for none)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic", "master"],
                        help="how ZO updates of bf16/fp16 weights are stored (no effect in fp32)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(C.DEFAULT_DATA_DIR))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the PNG goes beside it")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.quiet_transformers()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    full_methods = [m.strip() for m in args.full_methods.split(",") if m.strip()]
    unknown = [m for m in methods + full_methods if m not in STEP_METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(STEP_METHODS)}")
    if "peer-mezo" in methods:
        _import_peer()

    methods = methods + [FULL + m for m in full_methods]
    if args.memory_probe:  # internal: one measurement in this fresh process
        print(json.dumps(memory_probe(args.memory_probe, args)))
        return 0

    t_start = time.perf_counter()
    model, batch = setup(args)
    D = sum(p.numel() for p in model.parameters())
    print(f"[step_cost] {args.config} {args.dtype} on {args.device}: {D:,} parameters, batch {tuple(batch.input_ids.shape)}, "
          f"{int(batch.attention_mask.sum())} real tokens", file=sys.stderr)
    timings = time_all(model, batch, methods, args, D)
    loadavg = timings.pop("_loadavg_per_round")
    per_round = timings.pop("_per_round")
    for name, res in timings.items():
        print(f"  {name}: {res['median']:.3f} s" + (f", noise/D {res['noise_draws_over_params']:.2f}" if "noise_draws_over_params" in res else ""),
              file=sys.stderr)
    del model
    gc.collect()

    memory = None
    if not args.no_memory:
        common = ["--config", args.config, "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
                  "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--eps", str(args.eps), "--seed", str(args.seed),
                  "--data-seed", str(args.data_seed), "--data-dir", args.data_dir, "--memory-steps", str(args.memory_steps),
                  "--methods", args.methods, "--full-methods", args.full_methods, "--rounding", args.rounding]
        if args.threads:
            common += ["--threads", str(args.threads)]
        memory = measure_memory(["inference-label", "inference-full", *methods], common)

    two_body = 2 * timings["body_forward"]["median"]
    peer = timings.get("peer-mezo", {}).get("median")
    goals = compute_goals(timings, memory)
    def round_median(num: str, den: list[str], scale: float = 1.0) -> float | None:
        if num not in per_round or any(d not in per_round for d in den):
            return None
        vals = sorted(per_round[num][r] / (scale * sum(per_round[d][r] for d in den)) for r in range(args.repeats))
        return vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])

    ratios = {
        name: {
            "step_over_2_body": timings[name]["median"] / two_body,
            "step_over_2_body_within_round": round_median(name, ["body_forward"], 2.0),
            "step_over_2_closure": timings[name]["median"] / (2 * timings[forward_of(name)]["median"]),
            "step_over_2_closure_within_round": round_median(name, [forward_of(name)], 2.0),
            "over_peer_mezo_within_round": round_median(name, ["peer-mezo"]),
            "over_peer_mezo": timings[name]["median"] / peer if peer else None,
            "memory_over_inference_label": memory[name]["peak_bytes"] / memory["inference-label"]["peak_bytes"] if memory else None,
            "memory_over_inference_full": memory[name]["peak_bytes"] / memory["inference-full"]["peak_bytes"] if memory else None,
            "memory_over_inference_same_closure": memory[name]["peak_bytes"] / memory[inference_of(name)]["peak_bytes"] if memory else None,
            "largest_allocation_mib": memory[name]["largest_allocation_bytes"] / 2**20 if memory else None,
        }
        for name in methods
    }
    targets = GPU_GOALS if args.device.startswith("cuda") else GOALS
    result = {
        "command": "python -m benchmarks.step_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "memory_probe"},
        "environment": C.environment(args.device),
        "model": {"name": args.config, "params": D},
        "batch": {"size": args.batch_size, "seq_len": args.seq_len, "real_tokens": int(batch.attention_mask.sum())},
        "timings": timings,
        "timings_per_round": per_round,
        "loadavg_per_round": loadavg,
        "ratios": ratios,
        "memory": memory,
        "goals": {k: {"value": v, "goal": targets[k], "met": (v is not None and v <= targets[k])} for k, v in goals.items()},
        "notes": [
            "step_over_2_body: median step time / (2 x median body-only forward).",
            "memory peaks are per fresh process after loading (CPU: peak RSS, includes the Python/torch runtime and the weights).",
            "CurvZO-type step times vary with the sampled blocks; see noise_draws_per_step.",
        ],
        "runtime_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    C.write_json(out, result)
    _plot(result, out.with_suffix(".png"))
    print(render_table(result))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
