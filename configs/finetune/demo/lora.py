"""The embedded demo: LoRA on the small Llama in demo/base, teaching it to say what kind of thing a word names.

    jaxlora finetune --config=configs/finetune/demo/lora.py

The base was pretrained on generated stories only (no questions: see jaxlora/demo/build.py, which
regenerates demo/); the held-out questions ask about words that no training question asks about.
The run prints validation loss and exact match of the held-out answers before and after training,
and a few generated answers; `<out_dir>/summary.json` and `samples.json` keep them.
"""

from pathlib import Path

from jaxlora.config import base_config

DEMO = Path(__file__).resolve().parents[3] / "demo"


def get_config():
    cfg = base_config()
    cfg.checkpoint_dir = str(DEMO / "base")
    cfg.out_dir = "out/demo"
    cfg.precision = "32-true"  # XLA's CPU backend is no faster in bf16 on a model this small
    cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout = 8, 16, 0.0
    for target in ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head"):
        cfg[target] = True
    cfg.data.name = "json"
    cfg.data.json_path = str(DEMO / "data")
    cfg.data.prompt_style = "alpaca"
    cfg.data.mask_prompt = True  # the loss and exact match cover the answer and its EOS
    cfg.optimizer.lr = 3e-3
    cfg.train.update(epochs=None, max_steps=200, global_batch_size=16, micro_batch_size=16, lr_warmup_steps=10,
                     min_lr=2e-4, save_interval=200, log_interval=20)
    cfg.eval.update(interval=200, initial_validation=True, exact_match=True, max_new_tokens=8)
    cfg.checkpoint.max_to_keep = 1
    return cfg
