"""LitGPT config_hub/finetune/llama-3.1-8b/qlora.yaml: Llama 3.1 8B, QLoRA (bnb.nf4) on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    cfg = hub_recipe(
        "checkpoints/meta-llama/Meta-Llama-3.1-8B", "out/finetune/qlora-llama3.1-8b", quantize="bnb.nf4",
        micro_batch_size=2, epochs=2,
    )
    cfg.data.val_split_fraction = 0.05  # the yaml's (hub_recipe sets the all-layer recipes' 0.03847)
    return cfg
