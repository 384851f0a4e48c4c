"""LitGPT config_hub/finetune/llama-3.2-3B/qlora.yaml: Llama 3.2 3B, QLoRA (bnb.nf4) on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    cfg = hub_recipe(
        "checkpoints/meta-llama/Llama-3.2-3B", "out/finetune/qlora-llama3.2-3b", quantize="bnb.nf4",
        micro_batch_size=2, epochs=2,
    )
    cfg.data.val_split_fraction = 0.05  # the yaml's (hub_recipe sets the all-layer recipes' 0.03847)
    return cfg
