"""StableLM 2 1.6B, LoRA on query and value, Alpaca2k: the stablelm-base-alpha-3b recipe's settings."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/stabilityai/stablelm-2-1_6b", "out/finetune/lora-stablelm-2-1.6b",
                      micro_batch_size=1, epochs=4)
