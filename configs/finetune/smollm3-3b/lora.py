"""SmolLM3 3B (base), LoRA on query and value, Alpaca2k: the llama-3.2-3B recipe's settings (LitGPT's
config hub has no SmolLM3 recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/HuggingFaceTB/SmolLM3-3B-Base", "out/finetune/lora-smollm3-3b", micro_batch_size=1,
                      epochs=2)
