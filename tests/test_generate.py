"""KV-cache decoding (`GPT.forward_with_cache`, `jaxlora.generate`) on tiny random fp32 models.

Families: llama (GQA, LoRA on), gemma2 (sliding window 3 < sequence, attention and final
soft-capping, tied embeddings) and gpt_neox (partial rotary, parallel residual). The reference
is the full forward: by causality its logits at position i equal those of a forward over the
first i + 1 tokens, so one forward over the final sequence checks every greedy step.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.errors import ConfigError
from jaxlora.generate import Sampling, _generate, generate, left_pad, sample, stream
from jaxlora.models import rope
from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig

VOCAB = 64
_BASE = dict(vocab_size=VOCAB, padded_vocab_size=80, n_layer=2, n_embd=32, n_head=4, head_size=8,
             intermediate_size=64, block_size=40)
CONFIGS = {
    "llama": ModelConfig(name="tiny-llama", model_type="llama", n_query_groups=2, **_BASE),
    "gemma2": ModelConfig(name="tiny-gemma2", model_type="gemma2", n_query_groups=2, norm_unit_offset=True,
                          mlp_class="GemmaMLP", gelu_approximate=True, scale_embeddings=True, tie_embeddings=True,
                          post_attention_norm=True, post_mlp_norm=True, attention_scores_scalar=12,
                          attention_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window_size=3,
                          attention_types=("sliding", "global"), **_BASE),
    "gpt_neox": ModelConfig(name="tiny-neox", model_type="gpt_neox", n_query_groups=4, norm_class="LayerNorm",
                            parallel_residual=True, bias=True, mlp_class="GptNeoxMLP", rotary_percentage=0.25,
                            **_BASE),
    # Gemma 3: QK-norm, a sliding layer with its own RoPE base next to a global layer with scaled RoPE
    "gemma3": ModelConfig(name="tiny-gemma3", model_type="gemma3_text", n_query_groups=2, norm_unit_offset=True,
                          mlp_class="GemmaMLP", gelu_approximate=True, scale_embeddings=True, tie_embeddings=True,
                          post_attention_norm=True, post_mlp_norm=True, qk_norm="head", sliding_window_size=3,
                          attention_types=("sliding", "global"), rope_base=100000.0, rope_local_base=1000.0,
                          rope_scaling=rope.parse_rope_scaling(dict(rope_type="linear", factor=4.0),
                                                               max_position_embeddings=40), **_BASE),
    # longrope switches from short to long factors past 6 tokens: the cache path must follow the switch
    "phi3-longrope": ModelConfig(name="tiny-longrope", model_type="phi3", n_query_groups=2, rope_scaling=rope.parse_rope_scaling(
        dict(rope_type="longrope", short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[1.0, 2.5, 4.0, 8.0]),
        max_position_embeddings=40, original_max_position_embeddings=6), **_BASE),
}
# Sequence-length-dependent RoPE: a token's logits are those of the full forward over the tokens up to it
DYNAMIC = {name for name, c in CONFIGS.items() if rope.is_dynamic(c.rope_scaling)}


def _build(config: ModelConfig, lora: LoRAConfig = LoRAConfig()) -> GPT:
    """Random weights drawn with numpy into an abstract model (much faster than eager init on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(config, lora, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    scales = {"weight": 0.1, "bias": 0.02, "wte": 0.5, "lora_b": 0.2}  # norm weights: 1 + 0.1 n

    def init(path, x):
        name = path[-1].key
        n = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray((name == "weight") + n * scales.get(name, 1 / np.sqrt(x.shape[-2]) if x.ndim > 1 else 0))

    nnx.replace_by_pure_dict(state, jax.tree.map_with_path(init, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def models():
    lora = {"llama": LoRAConfig(r=4, alpha=8, query=True, value=True)}
    return {name: _build(config, lora.get(name, LoRAConfig())) for name, config in CONFIGS.items()}


def _prompts(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]


def _greedy_reference(model, prompt, generated, per_prefix=False):
    """argmax of the full forward's logits at every position that produced a generated token (per_prefix:
    of the full forward over the tokens up to that position, for sequence-length-dependent RoPE)."""
    seq = np.concatenate([prompt, generated])[None]
    if per_prefix:  # each prefix right-padded to one shape (padding moves no position: the same frequencies)
        forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
        ends = range(len(prompt), seq.shape[1])
        return np.array([np.asarray(forward(model, jnp.asarray(seq), jnp.asarray(np.arange(seq.shape[1]) < n)[None]))
                         [0, n - 1, :VOCAB].argmax() for n in ends])
    logits = np.asarray(model(jnp.asarray(seq)))[0, :, :VOCAB]
    return logits[len(prompt) - 1:-1].argmax(-1)


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - DYNAMIC))
def test_cache_logits_match_full_forward(models, name):
    """Feed a left-padded batch through the cache two tokens at a time: logits as the full forward."""
    model = models[name]
    ids = np.stack(_prompts(10, 10, seed=1))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    cache = model.init_cache(2, 12)
    step = nnx.jit(lambda m, ids, mask, cache: m.forward_with_cache(ids, cache, attention_mask=mask))
    for start, end in [(i, i + 2) for i in range(0, 10, 2)]:  # one shape: one compilation
        logits, cache = step(model, jnp.asarray(ids[:, start:end]), jnp.asarray(mask[:, start:end]), cache)
        real = mask[:, start:end].astype(bool)
        np.testing.assert_allclose(np.asarray(logits)[real], full[:, start:end][real], atol=1e-5, rtol=0)
    assert int(cache.index) == 10 and cache.k.shape == (2, 2, 12, CONFIGS[name].n_query_groups, 8)


def test_longrope_cache_logits_match_full_forward(models):
    """Past the switch to the long factors (a prompt of 7 > 6 tokens), cached steps equal the full forward;
    a forward that stays on the short side (the first 6 tokens alone) differs, so the switch is real.
    Generation across the switch prefills again: test_greedy_generate_matches_full_forward."""
    model = models["phi3-longrope"]
    ids = np.stack(_prompts(11, 11, seed=1))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    logits, cache = model.forward_with_cache(jnp.asarray(ids[:, :7]), model.init_cache(2, 12),
                                             attention_mask=jnp.asarray(mask[:, :7]))
    np.testing.assert_allclose(np.asarray(logits)[0], full[0, :7], atol=1e-5, rtol=0)
    for i in range(7, 11):
        logits, cache = model.forward_with_cache(jnp.asarray(ids[:, i:i + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, i], atol=1e-5, rtol=0)
    short = np.asarray(model(jnp.asarray(ids[:1, :6])))
    assert np.abs(short[0] - full[0, :6]).max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_matches_full_forward(models, name):
    model = models[name]
    (prompt,) = _prompts(5, seed=2)
    (out,) = generate(model, [prompt], max_new_tokens=10, prompt_bucket=8)
    assert len(out) == 10  # 5 + 10 tokens: longer than gemma2's window of 3
    np.testing.assert_array_equal(out, _greedy_reference(model, prompt, out, per_prefix=name in DYNAMIC))


def test_longrope_generation_prefills_again_at_the_switch(models):
    """Generating across the switch (5 prompt tokens, position 6 reached at the 2nd step): afterwards the
    cache holds what one prefill of the whole sequence gives, not the short-factor keys of before."""
    from jaxlora.generate import _prefill_jit, _settings, _step_jit, stop_array

    model = models["phi3-longrope"]
    ids, mask = left_pad(_prompts(5, seed=4), bucket=8)
    params, static = _settings(model, 6, Sampling(), None)
    s = _prefill_jit(params, ids, mask, stop_array(()), jax.random.key(0), **static)
    for _ in range(3):
        s = _step_jit(params, s, graphdef=static["graphdef"], sampling=Sampling())
    fed = int(s.step) - 1  # the latest token is drawn, not fed yet
    seq = np.concatenate([ids, np.asarray(s.tokens)[:, :fed]], axis=1)
    seq_mask = np.concatenate([mask, np.ones((1, fed), np.int32)], axis=1)
    _, ref = model.forward_with_cache(jnp.asarray(seq), model.init_cache(1, seq.shape[1]),
                                      attention_mask=jnp.asarray(seq_mask))
    real = seq_mask[0].astype(bool)
    np.testing.assert_allclose(np.asarray(s.cache.k)[:, 0, :seq.shape[1]][:, real],
                               np.asarray(ref.k)[:, 0][:, real], atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_prompt_alone(models):
    model = models["gemma2"]  # sliding window and soft-capping next to padding
    prompts = _prompts(3, 7, seed=3)
    batch = generate(model, prompts, max_new_tokens=6, prompt_bucket=8)
    compiled = _generate._cache_size()
    again = generate(model, _prompts(2, 8, seed=4), max_new_tokens=6, prompt_bucket=8)
    assert _generate._cache_size() == compiled  # same batch, bucket and length: no new compilation
    assert [len(a) for a in again] == [6, 6]
    for prompt, out in zip(prompts, batch):
        (alone,) = generate(model, [prompt], max_new_tokens=6, prompt_bucket=1)  # no padding at all
        np.testing.assert_array_equal(out, alone)


def test_top_k_1_sampling_equals_greedy(models):
    model = models["gemma2"]
    prompts = _prompts(4, 6, seed=5)
    greedy = generate(model, prompts, max_new_tokens=6, prompt_bucket=8)
    sampled = generate(model, prompts, max_new_tokens=6, prompt_bucket=8, key=jax.random.key(3),
                       sampling=Sampling(temperature=1.5, top_k=1))
    for g, s in zip(greedy, sampled):
        np.testing.assert_array_equal(g, s)


def test_sample_respects_top_k_top_p_and_vocab():
    logits = jnp.asarray([[0.0, 3.0, 2.9, 1.0, 50.0]])  # column 4 is vocab padding
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda s: np.asarray(jax.vmap(lambda k: sample(logits, k, s, vocab_size=4))(keys))[:, 0]
    assert set(draw(Sampling(temperature=1.0, top_k=2))) == {1, 2}
    assert set(draw(Sampling(temperature=1.0, top_p=0.5))) == {1, 2}  # p(1) ~ 0.49 < 0.5: token 2 joins
    assert set(draw(Sampling(temperature=1.0, top_p=0.3))) == {1}
    assert set(draw(Sampling(temperature=1.0))) == {0, 1, 2, 3}
    assert int(sample(logits, keys[0], Sampling(), vocab_size=4)[0]) == 1
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0.0)


def test_stop_sequences_and_stream(models):
    model = models["gpt_neox"]
    (prompt,) = _prompts(6, seed=6)
    settings = dict(max_new_tokens=10, prompt_bucket=8)  # as in test_greedy_generate_matches_full_forward
    (free,) = generate(model, [prompt], **settings)
    free = [int(t) for t in free]
    assert len(free) == 10
    firsts = [i for i in range(1, 10) if free[i] not in free[:i]]  # first occurrences after the first token
    never = VOCAB  # not a token of the vocabulary
    # Stop sets of one shape ([2, 2]): one compilation for both calls.
    cases = [(((free[firsts[2]],), (free[firsts[1] - 1], free[firsts[1]])), firsts[1] - 1),  # the pair first
             (((free[firsts[2]],), (never, never)), firsts[2])]  # the single token
    assert 0 < cases[0][1] < cases[1][1] < 10
    for stops, cut in cases:
        (stopped,) = generate(model, [prompt], stop_tokens=stops, **settings)
        np.testing.assert_array_equal(stopped, free[:cut])
    streamed = list(stream(model, prompt, stop_tokens=cases[0][0], **settings))
    np.testing.assert_array_equal(streamed, free[:cases[0][1]])
    np.testing.assert_array_equal(list(stream(model, prompt, **settings)), free)


def test_length_and_prompt_errors(models):
    model = models["llama"]
    with pytest.raises(ConfigError, match="context of 40 tokens"):
        generate(model, _prompts(30), max_new_tokens=11)
    with pytest.raises(ConfigError, match="at least one token"):
        left_pad([np.zeros(0, np.int32)])
    ids, mask = left_pad([[5, 6], [7, 8, 9]], bucket=4)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])


# ---------------------------------------------------------------------------------------------
# CLI: generate, chat, evaluate on a tiny random HF Llama checkpoint with a sentencepiece tokenizer.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint dir, run dir with final/lora.safetensors, the adapted model, dataset file)."""
    import dataclasses
    import json

    from _data_helpers import LLAMA2_TOKENIZER_CONFIG, make_sentencepiece_dir, write_json

    from jaxlora import save_hf_checkpoint
    from jaxlora.checkpoints.hf import load_model
    from jaxlora.finetune import save_lora_safetensors

    root = tmp_path_factory.mktemp("cli")
    config = ModelConfig(name="tiny-llama", model_type="llama", vocab_size=400, padded_vocab_size=400, n_layer=2,
                         n_embd=32, n_head=4, n_query_groups=2, intermediate_size=64, block_size=64)
    ckpt = save_hf_checkpoint(_build(config), root / "tiny-llama")
    make_sentencepiece_dir(ckpt, LLAMA2_TOKENIZER_CONFIG)
    lora = LoRAConfig(r=2, alpha=4, query=True, value=True)
    adapted = load_model(ckpt, lora=lora)
    state = nnx.state(adapted, nnx.LoRAParam)
    rng = np.random.default_rng(1)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype),
                                                 nnx.to_pure_dict(state)))
    nnx.update(adapted, state)
    save_lora_safetensors(nnx.to_pure_dict(state), root / "run" / "final" / "lora.safetensors",
                          metadata={"lora": json.dumps(dataclasses.asdict(lora))})
    words = "red green blue cat dog fish sun moon one two three four".split()
    records = [{"instruction": f"say {a} {b}", "input": "", "output": f"{b} {a}"} for a in words[:4] for b in words]
    write_json(root / "data.json", records[:24])
    return ckpt, root / "run", adapted, root / "data.json"


def _greedy_text(model, tokenizer, instruction, max_new_tokens):
    from jaxlora.data.prompts import PromptStyle

    style = PromptStyle.from_name("default")
    (ids,) = generate(model, [tokenizer.encode(style.apply(instruction))], max_new_tokens=max_new_tokens,
                      stop_tokens=style.stop_tokens(tokenizer))
    return tokenizer.decode(ids)


def test_cli_generate_with_adapter_and_chat(checkpoint, capsys, monkeypatch):
    import io

    from jaxlora.cli import main
    from jaxlora.data import Tokenizer

    ckpt, run, adapted, _ = checkpoint
    tokenizer = Tokenizer(ckpt)
    expected = _greedy_text(adapted, tokenizer, "say red", 6)
    flags = ["--checkpoint_dir", str(ckpt), "--precision", "32-true", "--temperature", "0", "--max_new_tokens", "6",
             "--prompt_style", "default"]
    assert main(["generate", *flags, "--adapter", str(run), "--prompt", "say red"]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n" and "6 tokens in" in out.err

    monkeypatch.setattr("sys.stdin", io.StringIO("say red\n!quit\n"))
    assert main(["chat", *flags, "--adapter", str(run)]) == 0
    assert capsys.readouterr().out == f">> Prompt: >> Reply: {expected}\n>> Prompt: "


def test_cli_evaluate_and_errors(checkpoint, capsys):
    from jaxlora.cli import main

    ckpt, run, _, data = checkpoint
    assert main(["evaluate", "--checkpoint_dir", str(ckpt), "--precision", "32-true", "--data.json_path", str(data),
                 "--data.val_split_fraction=0.25", "--data.prompt_style=default"]) == 0
    words = capsys.readouterr().out.splitlines()[-1].split()
    loss, ppl = float(words[2].rstrip(",")), float(words[4])

    # Reference: the same val split scored by one full forward of the right-padded examples.
    from jaxlora.checkpoints.hf import load_model
    from jaxlora.commands.generate import _data_config
    from jaxlora.data import Tokenizer, load_sft_splits

    data_cfg = _data_config(["--data.json_path", str(data), "--data.val_split_fraction=0.25",
                             "--data.prompt_style=default"])
    _, val = load_sft_splits(data_cfg, Tokenizer(ckpt), 64)
    width = max(len(e["input_ids"]) for e in val)
    ids = np.stack([np.pad(e["input_ids"], (0, width - len(e["input_ids"]))) for e in val])
    labels = np.stack([np.pad(e["labels"], (0, width - len(e["labels"])), constant_values=-100) for e in val])
    logits = np.asarray(load_model(ckpt)(jnp.asarray(ids), attention_mask=jnp.asarray(labels != -100)))
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    targets = labels[:, 1:]
    scored = targets != -100
    picked = np.take_along_axis(logp, np.where(scored, targets, 0)[..., None], axis=-1)[..., 0]
    reference = -picked[scored].sum() / scored.sum()
    assert words[:2] == ["val", "loss"] and words[5:] == [f"({scored.sum()}", "tokens,", "6", "examples)"]
    assert loss == pytest.approx(reference, abs=1e-4) and ppl == pytest.approx(np.exp(loss), rel=1e-3)

    for argv, message in [
        (["generate", "--checkpoint_dir", str(ckpt), "--max_new_tokens", "100"], "context of 64 tokens"),
        (["generate", "--checkpoint_dir", str(ckpt), "--top_p", "0"], "top_p must be"),
        (["evaluate", "--checkpoint_dir", str(ckpt), "--data.json_path"], "needs a value"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_sampler_logs_the_first_validation_answer_and_writes_all(checkpoint, caplog, tmp_path):
    import logging

    from jaxlora.config import base_config
    from jaxlora.data import Tokenizer
    from jaxlora.data.prompts import PromptStyle
    from jaxlora.data.sft import load_sft_records
    from jaxlora.models.lora import split_lora
    from jaxlora.training.samples import Sampler

    ckpt, _, adapted, data = checkpoint
    cfg = base_config()
    cfg.data.update(name="json", json_path=str(data), val_split_fraction=0.25, prompt_style="default")
    tokenizer = Tokenizer(ckpt)
    graphdef, lora, base = split_lora(adapted)
    val = load_sft_records(cfg.data)[1]
    style = PromptStyle.from_name("default")
    sampler = Sampler(graphdef, base, val, style, tokenizer, max_new_tokens=6, max_seq_length=64, count=2)
    with caplog.at_level(logging.INFO, logger="jaxlora"):
        sampler.at_validation(lora, 7)
    instruction = val[0]["instruction"]
    expected = _greedy_text(adapted, tokenizer, instruction, 6)
    assert caplog.messages[-1] == f"step 7 sample answer to {instruction!r}: {expected!r}"
    sampler.generate("after", lora)
    written = sampler.write(tmp_path)
    assert [s["expected"] for s in written] == [r["output"] for r in val[:2]] and written[0]["after"] == expected
    assert written[0]["prompt"] == style.apply(instruction, input=val[0].get("input", ""))
    assert json.loads((tmp_path / "samples.json").read_text()) == written
    short = Sampler(graphdef, base, val, style, tokenizer, max_new_tokens=6, max_seq_length=8)
    assert short.samples == []  # every prompt plus 6 new tokens exceeds 8
    short.at_validation(lora, 8)
    assert not any(m.startswith("step 8") for m in caplog.messages)  # nothing generated, nothing logged


def test_fit_calls_sample_after_each_validation(tmp_path):
    """The hook `finetune` fills with `Sampler.at_validation`; fake steps, so nothing compiles."""
    from jaxlora.training.loop import FitSettings, fit
    from jaxlora.training.sharding import make_mesh
    from jaxlora.training.step import TrainState

    def train_step(state, base, batch, key):
        return state.replace(step=state.step + 1), {"loss": 1.0, "grad_norm": 1.0}

    calls = []
    batch = {"input_ids": np.zeros((1, 1, 4), np.int32), "labels": np.zeros((1, 1, 4), np.int32)}
    val = [{"input_ids": np.zeros((1, 4), np.int32), "labels": np.zeros((1, 4), np.int32)}]
    fit(TrainState(step=np.int32(0), lora={}, opt_state=()), {}, train_step=train_step,
        eval_step=lambda lora, base, b: (np.float32(2.0), np.int32(4)), train_batches=iter([batch] * 5),
        key=None, mesh=make_mesh(), settings=FitSettings(max_steps=5, eval_interval=2, csv=False, progress_bar=False),
        out_dir=tmp_path, val_batches=val, sample=lambda lora, step: calls.append(step))
    assert calls == [2, 4, 5]  # periodic validations, then the final one
