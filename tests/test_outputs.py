"""Run outputs are Hugging Face folders: ``from_pretrained`` and ``PeftModel.from_pretrained`` load them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from curvzo.cli import main


def _train(tiny_dir: Path, data_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "2", "--eval-every", "2",
            "--lr", "1e-2", "--output-dir", str(out), "--no-progress", "--keep", "weights", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def _expected(results: dict, start: dict[str, torch.Tensor], run: Path) -> dict[str, torch.Tensor]:
    """Best weights: the start's when no evaluation beat zero-shot, else the last checkpoint's (one evaluation)."""
    return start if results["best_step"] == 0 else load_file(str(run / "checkpoint" / "model.safetensors"))


def _same(model: torch.nn.Module, expected: dict[str, torch.Tensor], rename=lambda name: name) -> None:
    params = dict(model.named_parameters())
    assert expected and all(torch.equal(params[rename(k)], v) for k, v in expected.items())


def test_best_is_a_pretrained_folder(tiny_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    results = _train(tiny_dir, data_dir, run, "--method", "mezo")
    best = run / "best"
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in best.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(best)
    AutoTokenizer.from_pretrained(best)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_dir).named_parameters())
    _same(model, _expected(results, {k: v.detach() for k, v in start.items()}, run))


@pytest.mark.parametrize("peft", ["lora", "prefix"])
def test_adapter_runs_save_a_peft_adapter_folder(tiny_dir, data_dir, tmp_path, peft):
    run = tmp_path / "run"
    _train(tiny_dir, data_dir, run, "--method", "mezo", "--peft", peft)
    assert (run / "best" / "adapter_config.json").exists() and (run / "best" / "tokenizer.json").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), run / "best")
    trained = load_file(str(run / "checkpoint" / "model.safetensors"))
    loaded = {k: v for k, v in model.named_parameters() if "lora_" in k or "prompt_encoder" in k}
    assert loaded.keys() == trained.keys()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_replay_writes_a_pretrained_folder(tiny_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    _train(tiny_dir, data_dir, run, "--method", "curvzo")
    assert main(["replay", str(tiny_dir), str(run / "trajectory.czt"), "--out", str(tmp_path / "rebuilt")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")
    AutoTokenizer.from_pretrained(tmp_path / "rebuilt")
    _same(model, load_file(str(run / "checkpoint" / "model.safetensors")))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}


def test_trajectory_runs_keep_small_things_and_rebuild_weights_on_demand(tiny_dir, data_dir, tmp_path, capsys):
    kept, small = tmp_path / "weights", tmp_path / "trajectory"
    settings = ("--method", "curvzo", "--steps", "4", "--eval-every", "2")
    _train(tiny_dir, data_dir, kept, *settings)
    _train(tiny_dir, data_dir, small, *settings, "--keep", "trajectory")
    assert not (small / "best").exists() and not (small / "checkpoint" / "model.safetensors").exists()
    assert (small / "checkpoint" / "state.pt").exists() and (small / "trajectory.czt").exists()
    assert _size(small) < _size(kept) / 2
    for step, reference in (("last", kept / "checkpoint" / "model.safetensors"), ("best", None)):
        assert main(["export", str(small), "--step", step, "--out", str(tmp_path / step)]) == 0
        expected = load_file(str(reference)) if reference else {k: v for k, v in _params(kept / "best").items()}
        rebuilt = _params(tmp_path / step)
        assert all(torch.equal(rebuilt[k], v) for k, v in expected.items())
    capsys.readouterr()
    assert main(["eval", str(kept), "--no-progress"]) == 0 and main(["eval", str(small), "--no-progress"]) == 0
    first, second = capsys.readouterr().out.split("}\n", 1)
    assert json.loads(first + "}") == json.loads(second)
    # A finished run extended with --resume: weights rebuilt from the trajectory, then trained on.
    for run in (kept, small):
        assert main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 0
    assert main(["export", str(small), "--step", "last", "--out", str(tmp_path / "extended")]) == 0
    rebuilt = _params(tmp_path / "extended")
    assert all(torch.equal(rebuilt[k], v) for k, v in load_file(str(kept / "checkpoint" / "model.safetensors")).items())


def test_first_order_runs_keep_weights_by_default(tiny_dir, data_dir, tmp_path):
    argv = ["train", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--num-train", "16",
            "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--steps", "1", "--method", "adamw",
            "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "best" / "config.json").exists()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
