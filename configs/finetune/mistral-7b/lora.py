"""LitGPT config_hub/finetune/mistral-7b/lora.yaml: Mistral 7B v0.1, LoRA on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/mistralai/Mistral-7B-v0.1", "out/finetune/lora-mistral-7b",
        micro_batch_size=2, epochs=4,
    )
