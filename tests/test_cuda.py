"""The CUDA path end to end: what CI cannot check (it has no GPU), run wherever one is present.

Noise on CUDA comes from a CUDA generator, so runs are compared with runs on the same device,
never with CPU runs: same seed -> the same weights, resume -> the uninterrupted run, and the
user's global RNG streams untouched.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from curvzo.cli import main
from curvzo.optim import MeZO
from test_cli import BF16_MASTER, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = ("--device", "cuda")


def _weights(folder):
    return load_file(str(folder / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("method", ["mezo", "curvzo", "curvzo-ref", "uniform-sparse", "adamw"])
def test_each_method_trains_on_cuda_and_saves_cpu_tensors(tiny_dir, data_dir, tmp_path, method):
    out = tmp_path / method
    assert run_cli(tiny_dir, data_dir, out, "--method", method, "--lr", "1e-3", *CUDA) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test"] is not None
    saved = _weights(out)
    assert saved and all(t.device.type == "cpu" and torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("precision", [(), BF16_MASTER], ids=["fp32", "bf16-master"])
def test_same_seed_is_bit_identical_and_resume_continues_it(tiny_dir, data_dir, tmp_path, precision):
    args = ("--steps", "4", "--eval-every", "2", "--lr", "1e-3", *precision, *CUDA)
    assert run_cli(tiny_dir, data_dir, tmp_path / "a", *args) == 0
    assert run_cli(tiny_dir, data_dir, tmp_path / "b", *args) == 0
    part = tmp_path / "part"
    assert run_cli(tiny_dir, data_dir, part, "--steps", "2", "--eval-every", "2", "--lr", "1e-3", *precision, *CUDA) == 0
    assert main(["train", "--resume", str(part), "--steps", "4", "--no-progress"]) == 0
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(part)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], load_file(str(tiny_dir / "model.safetensors"))[k]) for k in a)


def test_engine_leaves_the_global_cuda_rng_alone():
    model = torch.nn.Linear(64, 8).cuda()
    x = torch.randn(16, 64, device="cuda")
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    state = torch.cuda.get_rng_state()
    for _ in range(3):
        opt.step(lambda: model(x).square().mean())
    assert torch.equal(state, torch.cuda.get_rng_state())
