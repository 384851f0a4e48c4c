"""The embedded demo as QLoRA from the command line (slow: 200 steps, about a minute on 2 cores; CI
runs it with `pytest -m slow`): it learns (>= 95% exact match on the held-out questions), and
evaluate / generate / merge follow the run's quantization."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxlora import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"

pytestmark = pytest.mark.slow


def test_qlora_demo_learns_and_the_commands_follow_its_quantization(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["finetune", f"--config={REPO / 'configs/finetune/demo/qlora.py'}", f"--config.out_dir={out}",
                     "--config.eval.max_new_tokens=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_val_exact_match"] < 0.05 and summary["val_exact_match"] >= 0.95
    capsys.readouterr()

    # evaluate takes quantize (with precision, data settings) from the run: the run's own val loss
    assert cli.main(["evaluate", "--checkpoint_dir", str(DEMO / "base"), "--adapter", str(out)]) == 0
    printed = capsys.readouterr()
    assert "quantize='bnb.nf4'" in printed.err
    loss = float(re.search(r"val loss ([0-9.]+)", printed.out)[1])
    assert loss == pytest.approx(summary["val_loss"], rel=1e-4, abs=1e-6)
    # on the full-precision base the adapter is measurably another model
    assert cli.main(["evaluate", "--checkpoint_dir", str(DEMO / "base"), "--adapter", str(out),
                     "--quantize", "none"]) == 0
    assert float(re.search(r"val loss ([0-9.]+)", capsys.readouterr().out)[1]) != pytest.approx(loss, rel=1e-4)

    # merge folds the adapter into the dequantised NF4 weights and says so; the merged model's val loss is
    # the run's (bf16 storage of the merged weights: 2e-2 relative on a loss of ~2e-3)
    assert cli.main(["merge", "--checkpoint_dir", str(DEMO / "base"), "--adapter", str(out),
                     "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert "merging into the nf4-quantized base weights, dequantised" in capsys.readouterr().err
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (DEMO / "base" / name).is_file():
            assert (tmp_path / "merged" / name).is_file()
    assert cli.main(["evaluate", "--checkpoint_dir", str(tmp_path / "merged"),
                     f"--data.json_path={DEMO / 'data'}", "--data.prompt_style=alpaca", "--data.mask_prompt=True",
                     "--precision", "32-true"]) == 0
    merged_loss = float(re.search(r"val loss ([0-9.]+)", capsys.readouterr().out)[1])
    np.testing.assert_allclose(merged_loss, loss, rtol=1e-3, atol=1e-5)
