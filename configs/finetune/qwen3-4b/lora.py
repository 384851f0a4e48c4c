"""Qwen3 4B (base), LoRA on query and value, Alpaca2k: the llama-3.2-3B recipe's settings (LitGPT's
config hub has no Qwen3 recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/Qwen/Qwen3-4B-Base", "out/finetune/lora-qwen3-4b", micro_batch_size=1, epochs=2)
