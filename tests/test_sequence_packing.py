"""Sequence packing (`data.packed`, segment-confined attention in `GPT`): a packed batch trains exactly
as its examples unpacked. Tolerance 1e-5 (f32): the same products, the loss summed in another order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.data import BatchIterator
from jaxlora.data.packed import pack_examples, packing_efficiency
from jaxlora.errors import DataError
from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt import GPT, segment_positions
from jaxlora.models.lora import LoRAConfig, split_lora
from jaxlora.training.step import IGNORE_INDEX, sequence_loss

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)
CONFIGS = {
    "llama": dict(model_type="llama", intermediate_size=48),
    # a window shorter than the examples and soft-capped scores, on both kinds of layer
    "gemma2": dict(model_type="gemma2", intermediate_size=48, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "mixtral": dict(model_type="mixtral", intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
}


def _examples(rng, n, low=3, high=14):
    out = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        ids = rng.integers(4, VOCAB, length).astype(np.int32)
        labels = ids.copy()
        labels[: int(rng.integers(1, 3))] = IGNORE_INDEX  # a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_rows_hold_every_example_once_as_contiguous_segments():
    examples = _examples(np.random.default_rng(0), 200)
    rows = pack_examples(examples, 32, seed=5, pad_id=0)
    again = pack_examples(examples, 32, seed=5, pad_id=0)  # deterministic from the seed
    assert len(rows) == len(again) and all(np.array_equal(a[k], b[k]) for a, b in zip(rows, again) for k in a)
    seen = []
    for row in rows:
        seg = row["segment_ids"]
        n = int((seg > 0).sum())  # 1, 1, 2, 2, 2, ..., then padding 0
        assert seg.shape == (32,) and np.all(np.diff(seg[:n]) >= 0) and seg[0] == 1 and np.all(seg[n:] == 0)
        for k in range(1, seg.max() + 1):
            tokens, labels = row["input_ids"][seg == k], row["labels"][seg == k]
            match = [i for i, e in enumerate(examples) if np.array_equal(e["input_ids"], tokens)]
            assert match, "a segment is no example"
            e = examples[match[0]]
            assert labels[0] == IGNORE_INDEX and np.array_equal(labels[1:], e["labels"][1:])
            seen.append(match[0])
    assert sorted(seen) == list(range(len(examples)))  # (random ids: every example is distinct)
    assert packing_efficiency(rows) > 0.9  # first-fit decreasing on lengths 3..13 in rows of 32
    other = pack_examples(examples, 32, seed=6, pad_id=0)
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows, other))
    with pytest.raises(DataError, match="an example of 13 tokens does not fit a packed row of 12"):
        pack_examples(examples, 12, seed=5, pad_id=0)


def test_segment_positions_restart_in_each_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_packed_batches_resume_and_count_padding():
    rows = pack_examples(_examples(np.random.default_rng(1), 60), 32, seed=0, pad_id=0)
    it = BatchIterator(rows, 4, seed=3, seq_len=32, pad_id=0, length_bucket=8)
    next(it)
    again = BatchIterator(rows, 4, seq_len=32, pad_id=0, length_bucket=8, **it.position())
    for a, b in zip((next(it) for _ in range(5)), (next(again) for _ in range(5))):
        assert set(a) == {"input_ids", "labels", "segment_ids"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert 0 < it.epoch_padding_fraction() < 0.15


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_loss_and_gradients_equal_unpacked(family):
    config = ModelConfig.from_hf_config({**_COMMON, **CONFIGS[family]})
    lora = LoRAConfig(r=4, alpha=8, query=True, key=True, value=True, projection=True, mlp=True, head=True)
    model = GPT(config, lora, rngs=nnx.Rngs(0))
    graphdef, params, base = split_lora(model)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    examples = _examples(np.random.default_rng(2), 9)
    rows = pack_examples(examples, 40, seed=0, pad_id=0)
    assert len(rows) < len(examples)
    packed = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    width = max(len(e["input_ids"]) for e in examples)
    unpacked = {"input_ids": np.zeros((len(examples), width), np.int32),
                "labels": np.full((len(examples), width), IGNORE_INDEX, np.int32)}
    for i, e in enumerate(examples):
        unpacked["input_ids"][i, :len(e["input_ids"])] = e["input_ids"]
        unpacked["labels"][i, :len(e["labels"])] = e["labels"]

    def loss(params, batch):
        m = nnx.merge(graphdef, params, base)
        return sequence_loss(m, batch["input_ids"], batch["labels"], segment_ids=batch.get("segment_ids"), chunk_size=16)

    (got, got_count), got_grads = loss(params, packed), jax.grad(lambda p: loss(p, packed)[0])(params)
    (ref, ref_count), ref_grads = loss(params, unpacked), jax.grad(lambda p: loss(p, unpacked)[0])(params)
    assert int(got_count) == int(ref_count) > 0
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        assert float(jnp.abs(b).max()) > 0
        # 1e-5 of the leaf's largest gradient: these are gradients of a loss sum (values up to ~10)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_packed_demo_run_counts_real_tokens(tmp_path, caplog):
    """`data.packing=True` from the command line on a slice of the demo data: the run packs, trains, and
    reports real tokens (padding excluded) and the padding share; unpacked rows hold one example each."""
    import json
    from pathlib import Path

    from jaxlora import cli

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 64), ("val", 8)):
        lines = (repo / "demo" / "data" / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    summaries = {}
    for packing in (True, False):
        out = tmp_path / f"out-{packing}"
        args = ["finetune", f"--config={repo / 'configs/finetune/demo/lora.py'}", f"--config.out_dir={out}",
                f"--config.data.json_path={data}", "--config.train.max_steps=2", "--config.train.save_interval=2",
                "--config.eval.interval=2", "--config.eval.max_new_tokens=None", "--config.eval.initial_validation=False",
                "--config.train.max_seq_length=128", "--config.train.global_batch_size=4",
                "--config.train.micro_batch_size=4", f"--config.data.packing={packing}"]
        if not packing:
            args.append("--config.data.length_bucket=None")  # every batch 128 wide
        with caplog.at_level("INFO"):
            assert cli.main(args) == 0
        summaries[packing] = json.loads((out / "summary.json").read_text())
    assert "packed 64 train examples into" in caplog.text and "batch shape(s), each compiled once" in caplog.text
    packed, padded = summaries[True], summaries[False]
    # tokens count real tokens only: packed rows are 128 wide, so tokens = (1 - padding) x 2 steps x 4 rows x 128
    assert packed["tokens"] == round((1 - packed["padding_fraction"]) * 2 * 4 * 128)
    assert 0 < padded["padding_fraction"] < 1 and padded["tokens"] < packed["tokens"]  # 4 examples a step, unpacked
    assert packed["batch_shapes"] == padded["batch_shapes"] == 1
