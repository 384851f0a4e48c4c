"""Tokenizer: ids identical to transformers' AutoTokenizer on tokenizers built here; BOS/EOS rules."""

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from _data_helpers import (
    LLAMA2_TOKENIZER_CONFIG,
    LLAMA3_TOKENIZER_CONFIG,
    make_bpe_dir,
    make_sentencepiece_dir,
    write_json,
)

from jaxlora.data.tokenizer import Tokenizer
from jaxlora.errors import CheckpointError

# sentencepiece adds its dummy prefix even before a leading space while HF's Metaspace does not,
# and HF parses special-token text that sentencepiece treats as plain text: those cases differ
# between the two libraries themselves, so they are only compared for tokenizer.json.
TEXTS = [
    "Hello world",
    "the cat sat on the mat.",
    "Write a short poem about rain!\nThe rain falls.",
    "café naïve über 🙂 numbers 12 345",
    "",
    "a\nb  c\t d",
    "Zebra xylophone qqq",
    "trailing  ",
]
BPE_ONLY_TEXTS = ["  leading spaces", "<|eot_id|> special <|begin_of_text|>"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return make_sentencepiece_dir(tmp_path_factory.mktemp("ckpt") / "Llama-2-tiny", LLAMA2_TOKENIZER_CONFIG)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_dir(tmp_path_factory.mktemp("ckpt") / "Meta-Llama-3-tiny", LLAMA3_TOKENIZER_CONFIG)


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A tokenizer.json without a BOS template, to copy into directories with other config files."""
    return make_bpe_dir(tmp_path_factory.mktemp("plain") / "plain", bos_template=False) / "tokenizer.json"


def _checkpoint(tmp_path, name, tokenizer_json, **config_files):
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(tokenizer_json, directory / "tokenizer.json")
    for file_name, value in config_files.items():
        write_json(directory / f"{file_name}.json", value)
    return directory


def _auto_tokenizer(directory):
    """transformers' tokenizer for ``directory`` (the reference; skips where transformers is absent)."""
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(directory)


def _assert_same_ids(ours, theirs, texts):
    for text in texts:
        assert ours.encode(text).tolist() == theirs(text).input_ids, text
        assert ours.encode(text, bos=False).tolist() == theirs(text, add_special_tokens=False).input_ids, text
        ids = ours.encode(text, bos=False)
        assert ours.decode(ids) == theirs.decode(ids.tolist(), skip_special_tokens=True), text


def test_sentencepiece_matches_transformers(spm_dir):
    ours = Tokenizer(spm_dir)
    theirs = _auto_tokenizer(spm_dir)
    assert ours.backend == "sentencepiece"
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, None)
    assert ours.use_bos and ours.vocab_size == theirs.vocab_size
    _assert_same_ids(ours, theirs, TEXTS)


def test_tokenizer_json_matches_transformers(bpe_dir):
    ours = Tokenizer(bpe_dir)
    theirs = _auto_tokenizer(bpe_dir)
    assert ours.backend == "huggingface"
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.use_bos  # a Llama-3 checkpoint name always takes BOS
    _assert_same_ids(ours, theirs, TEXTS + BPE_ONLY_TEXTS)


def test_tokenizer_json_without_bos_matches_transformers(tmp_path, bpe_json):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_of_text|>"}
    directory = _checkpoint(tmp_path, "pythia-tiny", bpe_json, tokenizer_config=config)
    ours = Tokenizer(directory)
    theirs = _auto_tokenizer(directory)
    assert not ours.use_bos and ours.bos_id is None
    _assert_same_ids(ours, theirs, TEXTS + BPE_ONLY_TEXTS)


@pytest.mark.parametrize(
    "name, tokenizer_config, use_bos",
    [
        ("Meta-Llama-3-8B-Instruct", {"add_bos_token": False}, True),
        ("Llama-3.2-1B", {}, True),
        ("SmolLM2-135M-Instruct", {}, True),
        ("model", None, False),
        ("model", {"tokenizer_class": "LlamaTokenizer"}, True),
        ("model", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}, False),
        ("model", {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True}, True),
        ("model", {"tokenizer_class": "PreTrainedTokenizerFast"}, False),
    ],
)
def test_bos_rule(tmp_path, bpe_json, name, tokenizer_config, use_bos):
    files = {}
    if tokenizer_config is not None:
        files["tokenizer_config"] = {"bos_token": "<|begin_of_text|>", **tokenizer_config}
    tokenizer = Tokenizer(_checkpoint(tmp_path, name, bpe_json, **files))
    assert tokenizer.use_bos is use_bos
    has_bos = tokenizer.encode("hello world")[:1].tolist() == [tokenizer.token_to_id("<|begin_of_text|>")]
    assert has_bos is use_bos


def test_special_ids_from_config_files(tmp_path, bpe_json):
    directory = _checkpoint(
        tmp_path,
        "chat",
        bpe_json,
        tokenizer_config={"eos_token": {"content": "<|eot_id|>", "special": True}, "pad_token": "<pad>"},
        generation_config={"eos_token_id": [1, 2]},
        config={"bos_token_id": 0, "eos_token_id": 1},
    )
    tokenizer = Tokenizer(directory)
    eot, end = tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|end_of_text|>")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, eot, tokenizer.token_to_id("<pad>"))
    assert tokenizer.eos_ids == (eot, end)
    assert tokenizer.token_to_id("<not a token>") is None


def test_generation_config_with_trailing_comma_is_read(tmp_path, bpe_json):
    directory = _checkpoint(tmp_path, "m", bpe_json)
    (directory / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": [1, 2,],}')
    with pytest.warns(UserWarning, match="trailing commas"):
        tokenizer = Tokenizer(directory)
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (0, (1, 2))


def test_encode_options(bpe_dir):
    tokenizer = Tokenizer(bpe_dir)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    ids = tokenizer.encode("the cat sat", eos=True)
    assert ids.dtype == np.int32 and ids[0] == bos and ids[-1] == eos
    assert tokenizer.encode("<|begin_of_text|>the cat", bos=True).tolist().count(bos) == 1
    assert bos not in tokenizer.encode("<|begin_of_text|>the cat", bos=False).tolist()
    assert tokenizer.encode("the cat<|end_of_text|>", eos=True).tolist().count(eos) == 1
    assert len(tokenizer.encode("the cat sat on the mat", max_length=3)) == 3
    assert tokenizer.decode(tokenizer.encode("the cat sat", eos=True)) == "the cat sat"
    first = tokenizer.encode("cat", bos=False)[0]
    assert tokenizer.decode(first) == tokenizer.decode([int(first)]) != ""


def test_sentencepiece_token_lookup(spm_dir):
    tokenizer = Tokenizer(spm_dir)
    assert tokenizer.token_to_id("</s>") == tokenizer.eos_id == 2
    assert tokenizer.token_to_id("<unk>") == 0
    assert tokenizer.token_to_id("<|eot_id|>") is None


def test_tokenizer_json_takes_precedence(tmp_path, spm_dir, bpe_json):
    directory = make_sentencepiece_dir(tmp_path / "both")
    shutil.copy(bpe_json, directory / "tokenizer.json")
    assert Tokenizer(directory).backend == "huggingface"


@pytest.mark.parametrize("make", ["empty", "absent", "bad_config"])
def test_missing_or_broken_tokenizer_is_one_sentence(tmp_path, bpe_json, make):
    directory = tmp_path / "ckpt"
    if make == "empty":
        directory.mkdir()
        expected = "has neither tokenizer.json nor tokenizer.model"
    elif make == "absent":
        expected = "does not exist"
    else:
        directory = _checkpoint(tmp_path, "ckpt", bpe_json)
        (directory / "tokenizer_config.json").write_text("{not json")
        expected = "is not valid JSON"
    with pytest.raises(CheckpointError, match=expected) as error:
        Tokenizer(directory)
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message


def test_missing_eos_raises(tmp_path, bpe_json):
    tokenizer = Tokenizer(_checkpoint(tmp_path, "m", bpe_json))
    assert tokenizer.eos_id is None and tokenizer.eos_ids == ()
    with pytest.raises(CheckpointError, match="no EOS token"):
        tokenizer.encode("x", eos=True)


def test_config_json_is_used_last(tmp_path, bpe_json):
    directory = _checkpoint(tmp_path, "m", bpe_json, config={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 4})
    tokenizer = Tokenizer(directory)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 4)
