"""The accelerator benchmark (issue 9) is ready to run: its command works end to end on CPU at a
tiny shape, and its MFU is the step's model FLOPs over time over the measured peak."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import accelerator  # noqa: E402
from t5_vs_pytorch import t5_forward_flops  # noqa: E402


def test_accelerator_benchmark_runs_and_reports_mfu(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept text\n")
    args = accelerator.Args(shape="tiny", dtype="float32", pairs=4, prompt_len=16, completion_len=8,
                            sample_batch=4, new_tokens=8, steps=2, warmup=1, peak_sizes="128",
                            output=str(tmp_path / "acc.json"), docs=str(docs))
    r = accelerator.main(args)
    saved = json.load(open(tmp_path / "acc.json"))
    assert saved["train"]["step_s"] == pytest.approx(r["train"]["step_s"])
    t = r["train"]
    assert t["model_flops"] == 3 * t5_forward_flops(accelerator.SHAPES["tiny"], 8, 16, 8, prompts=4)
    assert t["flops_per_s"] == pytest.approx(t["model_flops"] / t["step_s"])
    assert r["sample"]["tokens_per_s"] == pytest.approx(4 * 8 / r["sample"]["call_s"])
    assert r["mixture"]["tokens_per_s"] > 0
    text = docs.read_text()
    assert "kept text" in text and "<!-- accelerator:begin -->" in text and "<!-- accelerator:end -->" in text
    mfu = 100 * t["flops_per_s"] / r["peak_flops_per_s"]
    assert f"**{mfu:.0f}%**" in text
