"""The embedded demo as QLoRA: the same run as lora.py with the base's block weights in NF4.

    jaxlora finetune --config=configs/finetune/demo/qlora.py
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("demo_lora", Path(__file__).with_name("lora.py"))
_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lora)


def get_config():
    cfg = _lora.get_config()
    cfg.out_dir = "out/demo-qlora"
    cfg.quantize = "bnb.nf4"
    return cfg
