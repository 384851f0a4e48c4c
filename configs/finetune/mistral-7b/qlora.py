"""LitGPT config_hub/finetune/mistral-7b/qlora.yaml: Mistral 7B v0.1, QLoRA (bnb.nf4) on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    cfg = hub_recipe(
        "checkpoints/mistralai/Mistral-7B-v0.1", "out/finetune/qlora-mistral-7b", quantize="bnb.nf4",
        micro_batch_size=2, epochs=4,
    )
    cfg.data.val_split_fraction = 0.05  # the yaml's (hub_recipe sets the all-layer recipes' 0.03847)
    return cfg
