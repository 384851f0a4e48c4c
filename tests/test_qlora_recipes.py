"""The 16 QLoRA recipes: each reproduces LitGPT's config_hub/finetune/<model>/qlora.yaml and validates."""

from pathlib import Path

import pytest

from jaxlora.config import LORA_TARGETS, accumulation_steps, load_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"

QV = {"lora_query", "lora_value"}
ALL = {"lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head"}

# Typed from the qlora.yaml files (LitGPT 26857050fe3ff627cd714fe92f5838f51a3d5efa), not from the recipes.
# folder: (checkpoint_dir, out_dir, quantize, lora_r, lora_alpha, lora_dropout, targets,
#          micro, global, epochs, lr_warmup_steps, save_interval, eval.interval, data.val_split_fraction)
QLORA = {
    "falcon-7b": ("checkpoints/tiiuae/falcon-7b", "out/finetune/qlora-falcon-7b", "bnb.nf4",
                  32, 16, 0.05, QV, 1, 8, 4, 10, 200, 100, 0.05),
    "gemma-2b": ("checkpoints/google/gemma-2b", "out/finetune/qlora-gemma-2b", "bnb.nf4",
                 16, 16, 0.1, ALL, 2, 6, 2, 200, 800, 25, 0.03847),
    "gemma-7b": ("checkpoints/google/gemma-7b", "out/finetune/qlora-gemma-7b", "bnb.nf4",
                 16, 16, 0.1, ALL, 1, 6, 2, 200, 800, 25, 0.03847),
    "gemma2-2b": ("checkpoints/google/gemma-2-2b", "out/finetune/qlora-gemma-2-2b", "bnb.nf4",
                  16, 16, 0.1, ALL, 2, 6, 2, 200, 800, 25, 0.03847),
    "gemma2-9b": ("checkpoints/google/gemma-2-9b", "out/finetune/qlora-gemma-2-9b", "bnb.nf4",
                  16, 16, 0.1, ALL, 1, 6, 2, 200, 800, 25, 0.03847),
    "llama-2-7b": ("checkpoints/meta-llama/Llama-2-7b-hf", "out/finetune/qlora-llama2-7b", "bnb.nf4",
                   32, 16, 0.05, QV, 2, 8, 4, 10, 200, 100, 0.05),
    "llama-3-8b": ("checkpoints/meta-llama/Meta-Llama-3-8B", "out/finetune/qlora-llama3-8b", "bnb.nf4",
                   32, 16, 0.05, QV, 2, 8, 2, 10, 200, 100, 0.05),
    "llama-3.1-8b": ("checkpoints/meta-llama/Meta-Llama-3.1-8B", "out/finetune/qlora-llama3.1-8b", "bnb.nf4",
                     32, 16, 0.05, QV, 2, 8, 2, 10, 200, 100, 0.05),
    "llama-3.2-1B": ("checkpoints/meta-llama/Llama-3.2-1B", "out/finetune/qlora-llama3.2-1b", "bnb.nf4",
                     32, 16, 0.05, QV, 2, 8, 2, 10, 200, 100, 0.05),
    "llama-3.2-3B": ("checkpoints/meta-llama/Llama-3.2-3B", "out/finetune/qlora-llama3.2-3b", "bnb.nf4",
                     32, 16, 0.05, QV, 2, 8, 2, 10, 200, 100, 0.05),
    "mistral-7b": ("checkpoints/mistralai/Mistral-7B-v0.1", "out/finetune/qlora-mistral-7b", "bnb.nf4",
                   32, 16, 0.05, QV, 2, 8, 4, 10, 200, 100, 0.05),
    # the yaml's out_dir is qlora-mistral-7b (the v0.1 recipe's); the recipe has its own, as its lora.py does
    "mistral-7b-v0.2": ("checkpoints/unsloth/Mistral-7B-v0.2", "out/finetune/qlora-mistral-7b-v0.2", "bnb.nf4",
                        32, 16, 0.05, QV, 2, 8, 4, 10, 200, 100, 0.05),
    "phi-2": ("checkpoints/microsoft/phi-2", "out/finetune/qlora-phi-2", "bnb.nf4",
              8, 16, 0.05, ALL, 4, 8, 1, 10, 800, 100, 0.03847),
    "phi-3": ("checkpoints/microsoft/Phi-3-mini-4k-instruct", "out/finetune/qlora-phi-3", "bnb.nf4",
              8, 16, 0.05, ALL, 4, 8, 1, 10, 800, 100, 0.03847),
    "stablelm-base-alpha-3b": ("checkpoints/stabilityai/stablelm-base-alpha-3b",
                               "out/finetune/qlora-stablelm-base-alpha-3b", "bnb.nf4",
                               32, 16, 0.05, QV, 1, 8, 4, 10, 200, 100, 0.05),
    "tiny-llama": ("checkpoints/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
                   "out/finetune/qlora-tiny-llama-1.1b", "bnb.nf4",
                   32, 16, 0.05, ALL, 8, 8, 3, 10, 800, 100, 0.03847),
}


def test_every_qlora_recipe_is_in_the_table():
    recipes = sorted(p.parent.name for p in CONFIGS.glob("*/qlora.py") if p.parent.name != "demo")  # demo: test_qlora_demo
    assert recipes == sorted(QLORA)


@pytest.mark.parametrize("folder", sorted(QLORA))
def test_qlora_recipe_matches_litgpt_and_validates(folder, tmp_path):
    (ckpt, out_dir, quantize, r, alpha, dropout, targets,
     micro, global_, epochs, warmup, save, eval_, val_split) = QLORA[folder]
    cfg = load_config(CONFIGS / folder / "qlora.py")
    assert (cfg.checkpoint_dir, cfg.out_dir, cfg.precision, cfg.quantize) == (ckpt, out_dir, "bf16-true", quantize)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (r, alpha, dropout)
    assert {t for t in LORA_TARGETS if cfg[t]} == targets
    t = cfg.train
    assert (t.micro_batch_size, t.global_batch_size, t.epochs, t.max_steps) == (micro, global_, epochs, None)
    assert (t.lr_warmup_steps, t.save_interval, cfg.eval.interval) == (warmup, save, eval_)
    assert (t.max_seq_length, t.min_lr, t.log_interval, t.max_norm, cfg.seed) == (512, 6e-5, 1, None, 1337)
    d = cfg.data
    assert (d.name, d.val_split_fraction, d.prompt_style) == ("alpaca2k", val_split, "alpaca")
    assert (d.mask_prompt, d.ignore_index, d.seed) == (False, -100, 42)
    o = cfg.optimizer
    assert (o.name, o.lr, o.weight_decay, o.betas) == ("adamw", 2e-4, 0.0, (0.9, 0.95))
    e = cfg.eval
    assert (e.max_iters, e.max_new_tokens, e.initial_validation, e.final_validation) == (100, 100, False, True)
    assert (cfg.logger.csv, cfg.logger.tensorboard) == (True, False)

    cfg = load_config(CONFIGS / folder / "qlora.py", [f"checkpoint_dir={tmp_path}"])
    validate(cfg)
    assert accumulation_steps(cfg) == global_ // micro
