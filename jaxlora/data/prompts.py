"""Prompt styles: how an instruction (and optional input) becomes the text the model sees.

The texts are LitGPT's (``litgpt/prompts.py``). ``PromptStyle.from_name`` picks a style by name;
``prompt_style_for_model`` picks one from a checkpoint/model name the way LitGPT's
``model_name_to_prompt_style`` does. LitGPT's finetune recipes use ``"alpaca"`` for every model.

Styles built for one instruction (alpaca, longform) place ``input`` in their own slot. Chat
styles have none: LitGPT drops ``input`` there; we append it to the instruction after a blank
line so that datasets with context (Dolly) keep it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

from jaxlora.errors import ConfigError

if TYPE_CHECKING:
    from jaxlora.data.tokenizer import Tokenizer


class PromptStyle:
    """Base style: the instruction as is ("default"); generation stops at the EOS id(s)."""

    name: ClassVar[str] = "default"
    stop_texts: ClassVar[tuple[tuple[str, ...], ...]] = ()
    """Token sequences (as token strings) that end a reply besides EOS; skipped if not in the vocabulary."""

    def apply(self, prompt: str, *, input: str = "") -> str:
        """The full prompt text for ``prompt`` (the instruction) and ``input`` (context, may be empty)."""
        return self.format(_with_input(prompt, input))

    def format(self, prompt: str) -> str:
        """Wraps a single user message in the style's template."""
        return prompt

    def stop_tokens(self, tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
        """Id sequences at which generation stops: each EOS id, then the style's own stop sequences."""
        stops = [(eos_id,) for eos_id in tokenizer.eos_ids]
        for texts in self.stop_texts:
            ids = tuple(tokenizer.token_to_id(text) for text in texts)
            if None not in ids and ids not in stops:
                stops.append(ids)
        return tuple(stops)

    @classmethod
    def from_name(cls, name: str) -> PromptStyle:
        """The style registered under ``name`` (see ``PROMPT_STYLES``)."""
        if name not in PROMPT_STYLES:
            known = ", ".join(sorted(PROMPT_STYLES))
            raise ConfigError(f"Unknown prompt style {name!r}; the known styles are: {known}.")
        return PROMPT_STYLES[name]()


def _with_input(prompt: str, input: str) -> str:
    return f"{prompt}\n\n{input}" if input else prompt


class Alpaca(PromptStyle):
    name = "alpaca"

    def apply(self, prompt: str, *, input: str = "") -> str:
        if input:
            return (
                "Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
            )
        return (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{prompt}\n\n### Response:\n"
        )


class FLAN(PromptStyle):
    name = "flan"

    def format(self, prompt: str) -> str:
        return (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{prompt}\n\n### Response:\n"
        )


class Longform(PromptStyle):
    name = "longform"

    def format(self, prompt: str) -> str:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{prompt}\n\n### Response:\n"
        )


class Llama2(PromptStyle):
    name = "llama2"
    system_prompt = (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as"
        " possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist,"
        " toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and"
        " positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why"
        " instead of answering something not correct. If you don't know the answer to a question, please don't"
        " share false information."
    )

    def format(self, prompt: str) -> str:
        return f"[INST] <<SYS>>\n{self.system_prompt}\n<</SYS>>\n\n {prompt} [/INST] "


class Llama3(PromptStyle):
    name = "llama3"
    stop_texts = (("<|eot_id|>",),)

    def format(self, prompt: str) -> str:
        return (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "You are a helpful assistant.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )


class Mistral(PromptStyle):
    """Mistral/Mixtral instruct and CodeLlama (LitGPT's ``codellama`` style)."""

    name = "mistral"

    def format(self, prompt: str) -> str:
        return f"[INST] {prompt} [/INST]"


class Gemma(PromptStyle):
    name = "gemma"
    stop_texts = (("<end_of_turn>",),)

    def format(self, prompt: str) -> str:
        return f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"


class Phi2(PromptStyle):
    name = "phi-2"

    def format(self, prompt: str) -> str:
        return f"Instruct: {prompt}\nOutput:"


class Phi3(PromptStyle):
    name = "phi-3"
    stop_texts = (("<|end|>",),)

    def format(self, prompt: str) -> str:
        return f"<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n{prompt}<|end|>\n<|assistant|>\n"


class TinyLlama(PromptStyle):
    """TinyLlama chat, which uses the Zephyr template."""

    name = "tinyllama"

    def format(self, prompt: str) -> str:
        return (
            "<|system|>\n"
            "You are a friendly chatbot who always gives helpful, detailed, and polite answers.</s>\n"
            f"<|user|>\n{prompt}</s>\n"
            "<|assistant|>\n"
        )


class Falcon(PromptStyle):
    name = "falcon"
    stop_texts = (("User", ":"),)

    def format(self, prompt: str) -> str:
        return f"{prompt}\nAnswer:"


class StableLMAlpha(PromptStyle):
    name = "stablelm-alpha"
    stop_texts = (("<|SYSTEM|>",), ("<|ASSISTANT|>",), ("<|USER|>",))

    def format(self, prompt: str) -> str:
        return (
            "<|SYSTEM|># StableLM Tuned (Alpha version)\n- StableLM is a helpful and harmless open-source AI language"
            " model developed by StabilityAI.\n- StableLM is excited to be able to help the user, but will refuse to do"
            " anything that could be considered harmful to the user.\n- StableLM is more than just an information"
            " source, StableLM is also able to write poetry, short stories, and make jokes.\n- StableLM will refuse to"
            f" participate in anything that could harm a human.<|USER|>{prompt}<|ASSISTANT|>"
        )


class StableLMZephyr(PromptStyle):
    name = "stablelm-zephyr"

    def format(self, prompt: str) -> str:
        return f"<|user|>\n{prompt}<|endoftext|>\n<|assistant|>\n"


class ChatML(PromptStyle):
    """ChatML with Qwen2.5's default system message (LitGPT's ``qwen2.5`` style)."""

    name = "chatml"
    stop_texts = (("<|im_end|>",),)
    system_prompt = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    def format(self, prompt: str) -> str:
        return (
            f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        )


PROMPT_STYLES: dict[str, type[PromptStyle]] = {
    style.name: style
    for style in (
        PromptStyle, Alpaca, FLAN, Longform, Llama2, Llama3, Mistral, Gemma, Phi2, Phi3,
        TinyLlama, Falcon, StableLMAlpha, StableLMZephyr, ChatML,
    )
}
PROMPT_STYLES.update(
    {"none": PromptStyle, "codellama": Mistral, "zephyr": TinyLlama, "qwen2.5": ChatML}
)

# (pattern, style), first match wins; the order and patterns follow LitGPT, matched case-insensitively.
_MODEL_NAME_PATTERNS: tuple[tuple[str, type[PromptStyle]], ...] = (
    (r"stablelm-tuned-alpha", StableLMAlpha),
    (r"stablelm-zephyr", StableLMZephyr),
    (r"falcon.*-instruct", Falcon),
    (r"llama-2.*-chat", Llama2),
    (r"llama-3.*-instruct", Llama3),
    (r"codellama|mi[sx]tral.*instruct", Mistral),
    (r"phi-2", Phi2),
    (r"phi-3", Phi3),
    (r"tiny-?llama.*chat", TinyLlama),
    (r"gemma.*-it", Gemma),
    (r"qwen2\.5-", ChatML),
)


def prompt_style_for_model(model_name: str) -> PromptStyle:
    """The prompt style a checkpoint was tuned with, from its name; ``default`` (plain text) if none."""
    for pattern, style in _MODEL_NAME_PATTERNS:
        if re.search(pattern, model_name, flags=re.IGNORECASE):
            return style()
    return PromptStyle()
