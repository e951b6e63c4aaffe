"""The model-side choices a run config names: weight dtypes and PEFT modes.

One table each, imported by :mod:`curvzo.config` (validation, help text), :mod:`curvzo.models`
(loading, adapters) and the benchmarks. It imports torch only, so reading a config does not pull
in transformers.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

__all__ = ["DTYPES", "PEFT_MODES", "PeftMode"]

#: Weight dtype name (as written in configs and flags) -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: ``none`` trains the model's own weights; ``lora`` and ``prefix`` train a PEFT adapter.
PeftMode = Literal["none", "lora", "prefix"]
PEFT_MODES: tuple[str, ...] = get_args(PeftMode)
