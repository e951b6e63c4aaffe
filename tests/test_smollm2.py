"""The real pretrained model end to end: LoRA + CurvZO (the Newton step) on SST-2 for a handful of steps."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from curvzo.cli import main


@pytest.mark.slow
def test_smollm2_lora_curvzo_on_sst2(data_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", "smollm2-135m", "--task", "sst2", "--data-dir", str(data_dir), "--peft", "lora",
            "--method", "curvzo", "--eps", "1e-2", "--steps", "4", "--eval-every", "2", "--batch-size", "8",
            "--num-train", "32", "--num-dev", "16", "--num-test", "16", "--max-length", "48",
            "--output-dir", str(out), "--no-progress", "--keep", "weights"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "smollm2-135m" and results["peft"] == "lora"
    assert results["forward_passes"] == 4 * 2 * 8
    assert 0.0 <= results["zero_shot"] <= 1.0 and 0.0 <= results["test"] <= 1.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(not r["skipped"] and r["curvature"] > 0 and r["step_lr"] > 0 for r in log)
    adapter = load_file(str(out / "best" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert {"loss.png", "dev.png"} <= {p.name for p in (out / "plots").iterdir()}
