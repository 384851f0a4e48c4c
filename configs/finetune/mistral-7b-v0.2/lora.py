"""LitGPT config_hub/finetune/mistral-7b-v0.2/lora.yaml: Mistral 7B v0.2, LoRA on query and value, Alpaca2k.

LitGPT writes to out/finetune/lora-mistral-7b, the v0.1 recipe's out_dir; this one has its own.
"""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/unsloth/Mistral-7B-v0.2", "out/finetune/lora-mistral-7b-v0.2",
        micro_batch_size=2, epochs=4,
    )
