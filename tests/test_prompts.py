"""Prompt styles: LitGPT's texts, lookup by name and by model name, stop tokens."""

import pytest
from _data_helpers import LLAMA3_TOKENIZER_CONFIG, make_bpe_dir

from jaxlora.data.prompts import PROMPT_STYLES, PromptStyle, prompt_style_for_model
from jaxlora.data.tokenizer import Tokenizer
from jaxlora.errors import ConfigError

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a color.\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a color.\n\n### Input:\nThe sky.\n\n### Response:\n"
)

EXPECTED = {
    "default": "Name a color.",
    "none": "Name a color.",
    "phi-2": "Instruct: Name a color.\nOutput:",
    "phi-3": "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nName a color.<|end|>\n<|assistant|>\n",
    "gemma": "<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "[INST] Name a color. [/INST]",
    "falcon": "Name a color.\nAnswer:",
    "stablelm-zephyr": "<|user|>\nName a color.<|endoftext|>\n<|assistant|>\n",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    ),
    "tinyllama": (
        "<|system|>\nYou are a friendly chatbot who always gives helpful, detailed, and polite answers.</s>\n"
        "<|user|>\nName a color.</s>\n<|assistant|>\n"
    ),
}


def test_alpaca_with_and_without_input():
    style = PromptStyle.from_name("alpaca")
    assert style.apply("Name a color.") == ALPACA_NO_INPUT
    assert style.apply("Name a color.", input="The sky.") == ALPACA_INPUT


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_style_text(name):
    assert PromptStyle.from_name(name).apply("Name a color.") == EXPECTED[name]


def test_llama2_system_prompt():
    text = PromptStyle.from_name("llama2").apply("Name a color.")
    assert text.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert text.endswith("share false information.\n<</SYS>>\n\n Name a color. [/INST] ")


def test_stablelm_alpha_turns():
    text = PromptStyle.from_name("stablelm-alpha").apply("Name a color.")
    assert text.startswith("<|SYSTEM|># StableLM Tuned (Alpha version)\n")
    assert text.endswith("harm a human.<|USER|>Name a color.<|ASSISTANT|>")


@pytest.mark.parametrize("name", sorted(set(PROMPT_STYLES) - {"alpaca"}))
def test_every_style_keeps_input(name):
    text = PromptStyle.from_name(name).apply("Name a color.", input="The sky.")
    assert "Name a color.\n\nThe sky." in text


def test_unknown_style_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"Unknown prompt style 'vicunya'; the known styles are: .*alpaca.*llama3"):
        PromptStyle.from_name("vicunya")


@pytest.mark.parametrize(
    "model_name, style",
    [
        ("Llama-2-7b-chat-hf", "llama2"),
        ("Llama-2-7b-hf", "default"),
        ("Meta-Llama-3-8B-Instruct", "llama3"),
        ("Llama-3.1-8B-Instruct", "llama3"),
        ("Meta-Llama-3-8B", "default"),
        ("Qwen2.5-0.5B-Instruct", "chatml"),
        ("gemma-2b-it", "gemma"),
        ("gemma-2-9b-it", "gemma"),
        ("phi-2", "phi-2"),
        ("Phi-3-mini-4k-instruct", "phi-3"),
        ("Mistral-7B-Instruct-v0.2", "mistral"),
        ("Mixtral-8x7B-Instruct-v0.1", "mistral"),
        ("Mistral-7B-v0.1", "default"),
        ("TinyLlama-1.1B-Chat-v1.0", "tinyllama"),
        ("tiny-llama-1.1b-chat", "tinyllama"),
        ("falcon-7b-instruct", "falcon"),
        ("stablelm-tuned-alpha-3b", "stablelm-alpha"),
        ("pythia-160m", "default"),
    ],
)
def test_style_for_model(model_name, style):
    assert prompt_style_for_model(model_name).name == style


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(make_bpe_dir(tmp_path_factory.mktemp("ckpt") / "Meta-Llama-3-tiny", LLAMA3_TOKENIZER_CONFIG))


def test_stop_tokens(tokenizer):
    eos, eot = tokenizer.eos_id, tokenizer.token_to_id("<|eot_id|>")
    assert PromptStyle.from_name("alpaca").stop_tokens(tokenizer) == ((eos,),)
    assert PromptStyle.from_name("llama3").stop_tokens(tokenizer) == ((eos,), (eot,))
    chatml = PromptStyle.from_name("chatml").stop_tokens(tokenizer)
    assert chatml == ((eos,), (tokenizer.token_to_id("<|im_end|>"),))
    # Stop sequences whose tokens the vocabulary lacks are left out.
    assert PromptStyle.from_name("gemma").stop_tokens(tokenizer) == ((eos,),)
    for name in PROMPT_STYLES:
        stops = PromptStyle.from_name(name).stop_tokens(tokenizer)
        assert stops[0] == (eos,) and all(isinstance(i, int) for stop in stops for i in stop)
