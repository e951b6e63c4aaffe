"""Shared helpers of the benchmark scripts (``python -m benchmarks.<name>``).

* model loading: SmolLM2-135M through :func:`curvzo.models.load_model` (the library's offline
  alias), or a random-initialised model of a real architecture (``opt-1.3b``, ``llama-1b``) built
  from its config, for speed and memory runs on a GPU;
* a real SST-2 batch rendered and encoded by the library (:mod:`curvzo.tasks`,
  :mod:`curvzo.data`, :mod:`curvzo.scoring`) and the label-only classification loss;
* timing (medians after warm-up, synchronised on CUDA), peak memory (VmHWM on Linux, reset once
  the model is loaded; ``torch.cuda.max_memory_allocated`` on CUDA);
* atomic writes of JSON and figures (temporary file + ``os.replace``) and plain-text tables.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from curvzo.io import atomic_write
from curvzo.model_options import DTYPES, torch_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: The task data: ``$CURVZO_DATA_DIR``, else the project layout, ``<checkout>/../shared/data``.
DEFAULT_DATA_DIR = Path(os.environ.get("CURVZO_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")

#: Random-initialised models of real shapes (no weights needed): speed and memory only.
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "opt-1.3b": {
        "model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
        "ffn_dim": 8192, "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
        "do_layer_norm_before": True, "tie_word_embeddings": True,
    },
    "llama-1b": {  # Llama-3.2-1B shapes
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    },
}

# ------------------------------------------------------------------------------------ files
def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic JSON write (non-finite floats become null / "inf")."""
    text = json.dumps(_jsonable(data), indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Atomic ``fig.savefig`` (the format comes from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, floatfmt: str = ".3g") -> str:
    """A plain-text table with right-aligned columns (numbers formatted with ``floatfmt``)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else str(v)
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


# ------------------------------------------------------------------------------------ environment
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": git_commit(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


# ------------------------------------------------------------------------------------ models and data
def load_lm(config: str = "smollm2-135m", *, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """``(model, tokenizer or None)`` in eval mode on ``device``.

    ``smollm2-135m`` goes through :func:`curvzo.models.load_model` (pretrained, offline alias);
    the names in :data:`ARCH_CONFIGS` build a random-initialised model of that shape (no tokenizer).
    """
    if config in ARCH_CONFIGS:
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = dict(ARCH_CONFIGS[config])
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(seed)  # a script, not the library: seeding the global RNG is fine here
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype))
        return model.eval(), None
    from curvzo.models import load_model

    model, tokenizer = load_model(config, dtype=dtype)
    return model.to(device).eval(), tokenizer


def sst2_examples(n: int, *, seed: int = 0, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> list[Any]:
    """``n`` rendered SST-2 training examples (MeZO prompt ``"{sentence} It was"``, " terrible"/" great")."""
    from curvzo.data import load_splits
    from curvzo.tasks import get_task

    task = get_task("sst2")
    splits = load_splits(task, data_dir=data_dir, num_train=n, num_dev=0, num_test=0, seed=seed)
    return [task.render(doc) for doc in splits.train[:n]]


def encode_batch(tokenizer: Any, examples: Sequence[Any], *, max_length: int, pad_to: int | None = None, device: str = "cpu"):
    """A :class:`curvzo.scoring.Batch` (``"single"`` layout), right-padded to ``pad_to`` if given."""
    import warnings

    from curvzo.scoring import encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # left truncation to max_length is intended here
        batch = encode(tokenizer, examples, max_length=max_length)
    if pad_to is not None and batch.input_ids.shape[1] < pad_to:
        extra = pad_to - batch.input_ids.shape[1]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.nn.functional.pad(batch.input_ids, (0, extra), value=pad_id)
        mask = torch.nn.functional.pad(batch.attention_mask, (0, extra), value=0)
        label_mask = torch.nn.functional.pad(batch.label_mask, (0, extra), value=False)
        batch = replace(batch, input_ids=ids, attention_mask=mask, label_mask=label_mask)
    return batch.to(device)


def random_batch(model: Any, *, batch_size: int, seq_len: int, device: str, seed: int = 0):
    """A synthetic single-layout batch for random-initialised models: random ids, two fixed choice tokens."""
    from curvzo.scoring import Batch

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch_size, seq_len), generator=gen)
    choice_ids = torch.tensor([[vocab // 3, 2 * vocab // 3]]).repeat(batch_size, 1)
    targets = torch.randint(0, 2, (batch_size,), generator=gen)
    batch = Batch(
        input_ids=ids, attention_mask=torch.ones_like(ids), targets=targets,
        label_mask=torch.zeros_like(ids, dtype=torch.bool), choice_ids=choice_ids, layout="single",
        max_length=seq_len, examples=(), tokenizer=None,
    )
    return batch.to(device)


def label_loss(model: Any, batch: Any) -> torch.Tensor:
    """The label-only classification loss (body forward + the candidate tokens' LM-head rows)."""
    from curvzo.scoring import classification_loss

    return classification_loss(model, batch)


def body(model: Any) -> torch.nn.Module:
    """The decoder stack without the LM head (``LlamaModel``, ``OPTDecoder``)."""
    return model.get_decoder()


# ------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device | str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Wall-clock seconds of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return summarize(times)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "repeats": len(times),
        "times": [round(t, 5) for t in times],
    }


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: str = "cpu") -> bool:
    """Start a fresh peak-memory window; True when the platform allows it (Linux clear_refs, CUDA)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def peak_memory_bytes(device: str = "cpu") -> int:
    """Peak since the last reset: VmHWM (ru_maxrss where /proc is missing), or CUDA max allocated."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    hwm = _read_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_memory_bytes(device: str = "cpu") -> int:
    if str(device).startswith("cuda"):
        return int(torch.cuda.memory_allocated())
    rss = _read_status_kib("VmRSS")
    return (rss or 0) * 1024


def run_json_subprocess(args: Sequence[str], *, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m <args>`` in a fresh interpreter and parse the last stdout line as JSON."""
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"subprocess {' '.join(args)} failed ({done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def quiet_transformers() -> None:
    """Silence load progress bars, so that tables and logs stay readable."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates while active (views and in-place results share
    an input's storage and allocate nothing). Tensors of ``skip_shape`` (e.g. one value per ZO
    block: per-block statistics, not weights) are left out."""

    def __init__(self, skip_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.skip_shape = skip_shape
        self.largest_bytes = 0
        self.largest_numel = 0
        self.op: Any = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) != self.skip_shape
                and t.untyped_storage().data_ptr() not in inputs and t.numel() * t.element_size() > self.largest_bytes
            ):
                self.largest_bytes, self.largest_numel, self.op = t.numel() * t.element_size(), t.numel(), func
        return out
