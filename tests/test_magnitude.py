"""The magnitude-mask bound: its masks, and the oracle's measurements split by them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_oracle import EXAMPLES
from tiny import tiny_model, tokenizer

from benchmarks.magnitude import DENSE, masked_parts, masks, report, shares, subsets
from benchmarks.oracle import measure
from curvzo import scoring


def test_the_masks_hold_their_fraction_of_a_tensor_smallest_largest_or_at_random() -> None:
    w = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    for fraction in (0.2, 0.5, 0.8):
        m = masks(w, fraction, torch.Generator().manual_seed(1))
        assert int(m["small"].sum()) == int(m["large"].sum()) == round(fraction * w.numel())
        assert abs(float(m["random"].float().mean()) - fraction) < 0.03
        assert float(w.abs()[m["small"]].max()) <= float(w.abs()[~m["small"]].min())
        assert float(w.abs()[m["large"]].min()) >= float(w.abs()[~m["large"]].max())


def test_measured_parts_split_energy_signal_and_every_trace_sample_of_the_whole_tensor() -> None:
    model = tiny_model("llama", seed=3, tie_word_embeddings=True)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [scoring.encode(tokenizer(), EXAMPLES[i:i + 2], max_length=32) for i in (0, 2, 4)]
    small = [masks(p.detach(), 0.5, torch.Generator().manual_seed(0))["small"] for p in params]
    split = measure(model, params, batches, samples=3, gen=torch.Generator().manual_seed(2),
                    parts=masked_parts([[m, ~m] for m in small]))
    whole = measure(model, params, batches, samples=3, gen=torch.Generator().manual_seed(2))
    for key in ("energy", "signal"):
        for b in range(len(params)):
            total, inside, outside = split[key][3 * b:3 * b + 3]
            assert total == pytest.approx(whole[key][b], rel=1e-9, abs=1e-15)
            assert inside + outside == pytest.approx(total, rel=1e-9, abs=1e-15)
    for per_part, per_tensor in zip(split["trace_samples"], whole["trace_samples"]):
        assert per_part[0::3] == pytest.approx(per_tensor, rel=1e-9, abs=1e-15)
        assert [a + b for a, b in zip(per_part[1::3], per_part[2::3])] == pytest.approx(per_part[0::3], rel=1e-9, abs=1e-15)


def test_the_gain_is_the_signal_share_over_the_root_of_the_energy_and_trace_shares_summed_over_tensors() -> None:
    names, per_tensor = subsets([torch.randn(4, 4), torch.randn(3)], fractions=(0.5,))
    assert names[0] == DENSE and len(per_tensor) == 2 and all(len(m) == len(names) - 1 for m in per_tensor)
    k = len(names)
    # two tensors; every mask of tensor 0 holds half its signal and a quarter of its trace, tensor 1 none of either
    energy = [1.0] + [0.5] * (k - 1) + [1.0] + [0.0] * (k - 1)
    signal = [2.0] + [1.0] * (k - 1) + [2.0] + [0.0] * (k - 1)
    traces = [[4.0 * s] + [1.0 * s] * (k - 1) + [4.0 * s] + [0.0] * (k - 1) for s in (0.5, 1.5)]
    rows = shares({"energy": energy, "signal": signal, "trace_samples": traces}, names, tensors=2)
    assert len(rows) == k - 1
    for row in rows:
        assert row["signal_share"] == pytest.approx(0.25) and row["trace_share"] == pytest.approx(0.125)
        assert row["energy_share"] == pytest.approx(0.25) and row["gain"] == pytest.approx(0.25 / math.sqrt(0.25 * 0.125))
        assert math.isclose(row["trace_share_se"], 0.0, abs_tol=1e-12)


def test_the_report_is_written_from_the_recorded_measurements(tmp_path) -> None:
    row = {"mask": "large", "fraction": 0.2, "energy_share": 0.18, "signal_share": 0.19, "trace_share": 0.146,
           "trace_share_se": 0.005, "gain": 1.306}
    (tmp_path / "magnitude.json").write_text(json.dumps({"results": {"sst2": {"batches": 8, "samples": 32, "rows": [row]}}}))
    text = report(tmp_path)
    assert (tmp_path / "magnitude.md").read_text() == text
    assert "sst2  large     0.200" in text and "1.306" in text
