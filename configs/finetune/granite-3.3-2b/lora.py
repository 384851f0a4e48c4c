"""Granite 3.3 2B (base), LoRA on query and value, Alpaca2k: the llama-3.2-3B recipe's settings (LitGPT's
config hub has no Granite recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/ibm-granite/granite-3.3-2b-base", "out/finetune/lora-granite-3.3-2b",
                      micro_batch_size=1, epochs=2)
