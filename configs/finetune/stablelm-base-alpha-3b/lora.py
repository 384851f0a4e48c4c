"""LitGPT config_hub/finetune/stablelm-base-alpha-3b/lora.yaml: StableLM 3B, LoRA on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/stabilityai/stablelm-base-alpha-3b", "out/finetune/lora-stablelm-base-alpha-3b",
        micro_batch_size=1, epochs=4,
    )
