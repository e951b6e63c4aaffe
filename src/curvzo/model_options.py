"""The model-side choices a run config names: weight dtypes and PEFT modes.

One table each, imported by :mod:`curvzo.config` (validation, help text), :mod:`curvzo.models`
(loading, adapters) and the benchmarks. It imports nothing heavy, so reading a config (and
``curvzo --help``) loads neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "PEFT_MODES", "PeftMode", "torch_dtype"]

#: Weight dtypes by the name configs and flags use, which is also their name in torch.
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)

#: ``none`` trains the model's own weights; ``lora`` and ``prefix`` train a PEFT adapter.
PeftMode = Literal["none", "lora", "prefix"]
PEFT_MODES: tuple[str, ...] = get_args(PeftMode)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPES`."""
    import torch

    return getattr(torch, name)
