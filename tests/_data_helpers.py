"""Tiny tokenizers built inside the tests (no downloads): a Llama-style sentencepiece model and a
byte-level BPE ``tokenizer.json``, each written into a checkpoint-like directory."""

from __future__ import annotations

import io
import json
from pathlib import Path

_WORDS = (
    "the cat dog bird fish horse mouse sat on mat while ran around quick brown fox jumps over lazy "
    "hello world instruction response input output answer question write a short poem about rain "
    "summarize text translate into French list three colors red green blue numbers 12 345 6789"
).split()

CORPUS = [
    " ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(12)) + (". " if i % 2 else "!\n")
    for i in range(120)
] + ["Below is an instruction that describes a task.\n\n### Instruction:\n### Response:\n", "café naïve über 🙂"]

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<pad>"]


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def make_sentencepiece_dir(directory: Path, tokenizer_config: dict | None = None) -> Path:
    """A ``tokenizer.model`` trained like Llama's (BPE, byte fallback, no normalisation); unk 0, bos 1, eos 2."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    if tokenizer_config is not None:
        write_json(directory / "tokenizer_config.json", tokenizer_config)
    return directory


LLAMA2_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}


def make_bpe_dir(directory: Path, tokenizer_config: dict | None = None, bos_template: bool = True) -> Path:
    """A byte-level BPE ``tokenizer.json``; its post-processor prepends ``<|begin_of_text|>`` if ``bos_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos_template:
        bos_id = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    tokenizer.save(str(directory / "tokenizer.json"))
    if tokenizer_config is not None:
        write_json(directory / "tokenizer_config.json", tokenizer_config)
    return directory


LLAMA3_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
}
