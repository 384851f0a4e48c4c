"""LitGPT config_hub/finetune/tiny-llama/qlora.yaml: TinyLlama 1.1B, QLoRA (bnb.nf4) on every linear layer, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "out/finetune/qlora-tiny-llama-1.1b",
        quantize="bnb.nf4", all_targets=True, micro_batch_size=8, epochs=3, save_interval=800,
    )
