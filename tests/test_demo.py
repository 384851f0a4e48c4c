"""The embedded demo (its artifacts, its config, a two-step run) and the teacher-forced exact-match metric."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora import cli
from jaxlora.config import load_config, validate
from jaxlora.demo.world import KIND_ANSWERS, KIND_QUESTIONS
from jaxlora.errors import ConfigError
from jaxlora.generate import generate
from jaxlora.models.gpt import GPT
from jaxlora.training.step import IGNORE_INDEX, sequence_eval

from _train_helpers import TINY

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune" / "demo" / "lora.py"
DEMO = REPO / "demo"


def _records(split: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / "data" / f"{split}.jsonl").read_text().splitlines()]


def test_demo_config_validates_and_points_into_the_repo():
    cfg = load_config(CONFIG)
    validate(cfg)
    assert Path(cfg.checkpoint_dir) == DEMO / "base" and Path(cfg.data.json_path) == DEMO / "data"
    assert cfg.eval.exact_match and cfg.eval.initial_validation and cfg.data.mask_prompt


def _asked_word(record: dict) -> str:
    """The word a record asks about: the {w} of its instruction's template."""
    for question in KIND_QUESTIONS:
        match = re.fullmatch(re.escape(question).replace(re.escape("{w}"), "(.+)"), record["instruction"])
        if match:
            return match.group(1)
    raise AssertionError(f"no question template matches {record['instruction']!r}")


def test_demo_artifacts_are_small_and_val_words_are_held_out():
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size < 20e6
    train, val = _records("train"), _records("val")
    assert all(set(r) == {"instruction", "input", "output"} and r["input"] == "" for r in train + val)
    assert {r["output"] for r in val} == set(KIND_ANSWERS.values())
    assert not {_asked_word(r) for r in train} & {_asked_word(r) for r in val}


def test_exact_match_needs_masked_prompts():
    cfg = load_config(CONFIG, ["data.mask_prompt=False"])
    with pytest.raises(ConfigError, match="data.mask_prompt=True"):
        validate(cfg)


def test_two_step_demo_run_writes_its_outputs(tmp_path, capsys):
    data = tmp_path / "data"  # a slice of the demo data keeps the run short
    data.mkdir()
    for split, n in (("train", 32), ("val", 8)):
        lines = (DEMO / "data" / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli.main(["finetune", f"--config={CONFIG}", f"--config.out_dir={out}", f"--config.data.json_path={data}",
                     "--config.train.max_steps=2", "--config.train.save_interval=2", "--config.eval.interval=2",
                     "--config.eval.max_new_tokens=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    for key in ("initial_val_loss", "val_loss", "initial_val_exact_match", "val_exact_match"):
        assert summary[key] is not None
    assert 0 <= summary["val_exact_match"] <= 1
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 3 and all(set(s) == {"prompt", "expected", "before", "after"} for s in samples)
    assert samples[0]["expected"] == _records("val")[0]["output"]
    assert (out / "final" / "lora.safetensors").is_file()
    assert "val_exact_match" in (out / "metrics.csv").read_text().splitlines()[0]

    # The README's evaluate command follows the run (prompt style, masking, length, the data split): its val
    # loss is the run's final one (up to the order of fp32 sums over other batch shapes: 1e-4 relative)
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint_dir", str(DEMO / "base"), "--adapter", str(out),
                     f"--data.json_path={data}"]) == 0
    printed = capsys.readouterr()
    assert "data.prompt_style='alpaca'" in printed.err and "data.mask_prompt=True" in printed.err
    loss = float(re.search(r"val loss ([0-9.]+)", printed.out)[1])
    assert loss == pytest.approx(summary["val_loss"], rel=1e-4)
    # a flag still overrides what the run used
    assert cli.main(["evaluate", "--checkpoint_dir", str(DEMO / "base"), "--adapter", str(out),
                     f"--data.json_path={data}", "--data.mask_prompt=False"]) == 0
    assert abs(float(re.search(r"val loss ([0-9.]+)", capsys.readouterr().out)[1]) - loss) > 1.0
    # generate (and chat, through the same defaults) prompt in the run's style and precision
    assert cli.main(["generate", "--checkpoint_dir", str(DEMO / "base"), "--adapter", str(out), "--prompt", "hi",
                     "--max_new_tokens", "2", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "precision='32-true'" in err and "data.prompt_style='alpaca'" in err


class _Oracle:
    """A stand-in model whose logits at each position are one-hot at the token it is told to predict."""

    def __init__(self, predictions: np.ndarray, vocab_size: int, padded_vocab_size: int):
        self.predictions, self.padded = jnp.asarray(predictions), padded_vocab_size
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def hidden_states(self, input_ids, **kwargs):
        hidden = jax.nn.one_hot(self.predictions, self.padded)
        return hidden.at[..., -1].set(2.0)  # a padding column beats every real token: must be ignored

    def logits_head(self):
        return lambda params, hidden: hidden, ()


def test_exact_match_on_a_hand_made_case():
    vocab = 10
    ids = np.array([[5, 6, 7, 8, 9, 2], [5, 6, 7, 3, 4, 2], [0, 0, 0, 0, 0, 0]], np.int32)
    labels = ids.copy()
    labels[:, :3] = IGNORE_INDEX  # prompt of 3 tokens; answer and EOS labelled
    labels[2] = IGNORE_INDEX  # a batch-padding row: not scored
    perfect = np.concatenate([ids[:, 1:], np.zeros((3, 1), np.int32)], axis=1)  # position i predicts token i + 1
    perfect[:, 0] = 1  # a wrong guess inside the prompt does not count

    def score(predictions):
        _, count, exact, scored = jax.device_get(
            sequence_eval(_Oracle(predictions, vocab, vocab + 2), jnp.asarray(ids), jnp.asarray(labels), chunk_size=4))
        return int(count), int(exact), int(scored)

    assert score(perfect) == (6, 2, 2)  # 3 targets per row (2 answer tokens + EOS): exact match 1.0
    wrong = perfect.copy()
    wrong[0, 3] = 4  # the second answer token of row 0
    assert score(wrong) == (6, 1, 2)
    wrong[1, 4] = 7  # the EOS of row 1
    assert score(wrong) == (6, 0, 2)  # exact match 0.0


def test_teacher_forced_exact_match_equals_greedy_reproduction():
    model = GPT(TINY, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    prompt = np.array([11, 42, 7, 99, 3, 58], np.int32)
    answer = generate(model, [prompt], max_new_tokens=5)[0]
    ids = np.concatenate([prompt, answer])[None]
    labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX), answer])[None].astype(np.int32)
    assert int(sequence_eval(model, jnp.asarray(ids), jnp.asarray(labels))[2]) == 1
    labels[0, -1] = (labels[0, -1] + 1) % TINY.vocab_size
    assert int(sequence_eval(model, jnp.asarray(ids), jnp.asarray(labels))[2]) == 0
