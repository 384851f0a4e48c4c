"""LitGPT config_hub/finetune/falcon-7b/qlora.yaml: Falcon 7B, QLoRA (bnb.nf4) on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    cfg = hub_recipe(
        "checkpoints/tiiuae/falcon-7b", "out/finetune/qlora-falcon-7b", quantize="bnb.nf4",
        micro_batch_size=1, epochs=4,
    )
    cfg.data.val_split_fraction = 0.05  # the yaml's (hub_recipe sets the all-layer recipes' 0.03847)
    return cfg
