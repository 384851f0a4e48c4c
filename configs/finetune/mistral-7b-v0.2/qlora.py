"""LitGPT config_hub/finetune/mistral-7b-v0.2/qlora.yaml: Mistral 7B v0.2, QLoRA (bnb.nf4) on query and value, Alpaca2k.

LitGPT writes to out/finetune/qlora-mistral-7b, the v0.1 recipe's out_dir; this one has its own.
"""

from jaxlora.config import hub_recipe


def get_config():
    cfg = hub_recipe(
        "checkpoints/unsloth/Mistral-7B-v0.2", "out/finetune/qlora-mistral-7b-v0.2", quantize="bnb.nf4",
        micro_batch_size=2, epochs=4,
    )
    cfg.data.val_split_fraction = 0.05  # the yaml's (hub_recipe sets the all-layer recipes' 0.03847)
    return cfg
