"""Build the embedded demo under `demo/`: a pretrained base checkpoint and an instruction dataset.

    python -m jaxlora.demo.build                 # rewrites demo/base and demo/data (~10-15 min on 2 CPU cores)
    python -m jaxlora.demo.build --out=/tmp/demo # somewhere else

What it writes (see `world` for the stories and the task):

    demo/base/   config.json, model.safetensors (bf16), generation_config.json, tokenizer.model,
                 tokenizer_config.json, special_tokens_map.json: a small Llama (HF format) whose
                 every parameter was trained from scratch here, with `GPT`, on generated stories
    demo/data/   train.jsonl, val.jsonl: Alpaca-form "what kind of word is X?" questions, which the
                 base never saw (its corpus has no questions); no word of val.jsonl is in train.jsonl

Steps: generate the corpus -> train a sentencepiece BPE tokenizer (1024 pieces, byte fallback,
<unk>=0 <s>=1 </s>=2 <pad>=3) on the corpus and the Alpaca-formatted training prompts -> pack
the stories into rows -> full-parameter fp32 pretraining (`pretrain`) -> save as an HF checkpoint
(bf16) -> reload it with `load_model` and check its predictions. Everything is seeded; a rebuild
with the same jax version on the same CPU gives the same files.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlora.checkpoints.hf import load_model
from jaxlora.models.families import hf_config_dict
from jaxlora.checkpoints.hf_export import save_hf_checkpoint
from jaxlora.data import PromptStyle, Tokenizer
from jaxlora.demo.pretrain import pack, pretrain
from jaxlora.demo.world import World, corpus, kind_split
from jaxlora.models.config import ModelConfig

log = logging.getLogger("jaxlora.demo.build")

REPO_DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
SEED = 0
N_STORIES = 24_000
N_TRAIN, N_VAL = 2400, 200
VOCAB_SIZE = 1024
UNK, BOS, EOS, PAD = 0, 1, 2, 3
SEQ_LEN = 128
MODEL = ModelConfig(name="jaxlora-demo-llama", model_type="llama", vocab_size=VOCAB_SIZE,
                    padded_vocab_size=VOCAB_SIZE, n_layer=4, n_embd=256, n_head=4, n_query_groups=2,
                    intermediate_size=768, block_size=512)
PRETRAIN = dict(steps=800, batch_size=16, lr=2e-3)


def train_tokenizer(texts: list[str], directory: Path) -> None:
    """tokenizer.model (sentencepiece BPE), tokenizer_config.json and special_tokens_map.json in `directory`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        num_threads=1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(directory / "special_tokens_map.json", special)
    _write_json(directory / "tokenizer_config.json", {
        **special, "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "model_max_length": MODEL.block_size, "clean_up_tokenization_spaces": False})
    _write_json(directory / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS,
                                                       "pad_token_id": PAD})


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def build(out: Path, *, steps: int = PRETRAIN["steps"], model_config: ModelConfig = MODEL) -> None:
    """Write `out`/base and `out`/data (replacing them)."""
    t0 = time.perf_counter()
    world = World(SEED)
    stories = list(corpus(SEED + 1, N_STORIES, world))
    train, val = kind_split(SEED + 2, N_TRAIN, world, "train"), kind_split(SEED + 3, N_VAL, world, "val")
    alpaca = PromptStyle.from_name("alpaca")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tok_dir.mkdir()
        train_tokenizer(stories + [alpaca.apply(r["instruction"], input=r["input"]) for r in train], tok_dir)
        tokenizer = Tokenizer(tok_dir)
        rows = pack(stories, tokenizer, SEQ_LEN)
        log.info("corpus: %d stories, %d tokens in %d rows of %d", len(stories), rows.size, len(rows), SEQ_LEN)
        model = pretrain(model_config, rows, steps=steps, seed=SEED, **{k: v for k, v in PRETRAIN.items()
                                                                         if k != "steps"})
        hf = {**hf_config_dict(model_config, "bfloat16"), "_name_or_path": model_config.name,
              "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
        base = out / "base"
        if base.exists():
            shutil.rmtree(base)
        save_hf_checkpoint(model, base, dtype=ml_dtypes.bfloat16, hf_config=hf,
                           extra_files=sorted(tok_dir.iterdir()))
    check_reload(model, base, rows[:4])
    write_jsonl(train, out / "data" / "train.jsonl")
    write_jsonl(val, out / "data" / "val.jsonl")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("wrote %s (%.1f MB) in %.0f s", out, size / 1e6, time.perf_counter() - t0)


def check_reload(model, directory: Path, ids: np.ndarray) -> None:
    """The saved checkpoint, loaded with `load_model`, predicts as the trained model (up to bf16 rounding)."""
    reloaded = load_model(directory, dtype="float32")
    ids = jnp.asarray(ids)
    want, got = jax.device_get(model(ids)), jax.device_get(reloaded(ids))
    agree = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    log.info("reloaded checkpoint: %.1f%% of argmax predictions unchanged by bf16 storage", 100 * agree)
    if agree < 0.95:
        raise RuntimeError(f"the reloaded checkpoint disagrees with the trained model on {100 - 100 * agree:.1f}% "
                           "of predictions")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_DEMO_DIR, help="output directory (default: demo/)")
    parser.add_argument("--steps", type=int, default=PRETRAIN["steps"], help="pretraining steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    build(args.out, steps=args.steps)


if __name__ == "__main__":
    main()
