"""Config layer: defaults, the 16 LitGPT hub recipes and jaxlora's own, overrides, validation messages, CLI flag handling."""

import json
import re
import sys
import types
from pathlib import Path

import pytest

from jaxlora import cli
from jaxlora.config import LORA_TARGETS, accumulation_steps, apply_overrides, base_config, load_config, validate
from jaxlora.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"

# folder: (checkpoint_dir, lora_r, lora_dropout, all targets, micro, global, epochs, warmup, save, eval)
RECIPES = {
    "falcon-7b": ("tiiuae/falcon-7b", 32, 0.05, False, 1, 8, 4, 10, 200, 100),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", 32, 0.05, False, 2, 8, 4, 10, 200, 100),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", 32, 0.05, False, 2, 8, 4, 10, 200, 100),
    "mistral-7b-v0.2": ("unsloth/Mistral-7B-v0.2", 32, 0.05, False, 2, 8, 4, 10, 200, 100),
    "stablelm-base-alpha-3b": ("stabilityai/stablelm-base-alpha-3b", 32, 0.05, False, 1, 8, 4, 10, 200, 100),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "llama-3.1-8b": ("meta-llama/Meta-Llama-3.1-8B", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "llama-3.2-1B": ("meta-llama/Llama-3.2-1B", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "llama-3.2-3B": ("meta-llama/Llama-3.2-3B", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "tiny-llama": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 32, 0.05, True, 8, 8, 3, 10, 800, 100),
    "phi-2": ("microsoft/phi-2", 8, 0.05, True, 4, 8, 1, 10, 800, 100),
    "phi-3": ("microsoft/Phi-3-mini-4k-instruct", 8, 0.05, True, 4, 8, 1, 10, 800, 100),
    "gemma-2b": ("google/gemma-2b", 8, 0.1, True, 2, 6, 2, 200, 800, 25),
    "gemma2-2b": ("google/gemma-2-2b", 8, 0.1, True, 2, 6, 2, 200, 800, 25),
    "gemma-7b": ("google/gemma-7b", 16, 0.1, True, 1, 6, 2, 200, 800, 25),
    "gemma2-9b": ("google/gemma-2-9b", 16, 0.1, True, 1, 6, 2, 200, 800, 25),
}
# jaxlora's recipes for families LitGPT's config hub does not cover (the settings of its nearest recipe)
OWN_RECIPES = {
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B-Base", 32, 0.05, False, 2, 8, 2, 10, 200, 100),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B-Base", 32, 0.05, False, 2, 8, 2, 10, 200, 100),
    "qwen3-4b": ("Qwen/Qwen3-4B-Base", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "qwen3-8b": ("Qwen/Qwen3-8B-Base", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "gemma3-1b": ("google/gemma-3-1b-pt", 8, 0.1, True, 2, 6, 2, 200, 800, 25),
    "gemma3-4b": ("google/gemma-3-4b-pt", 16, 0.1, True, 1, 6, 2, 200, 800, 25),
    "olmo2-1b": ("allenai/OLMo-2-0425-1B", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "olmo2-7b": ("allenai/OLMo-2-1124-7B", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "smollm3-3b": ("HuggingFaceTB/SmolLM3-3B-Base", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "granite-3.3-2b": ("ibm-granite/granite-3.3-2b-base", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "granite-3.3-8b": ("ibm-granite/granite-3.3-8b-base", 32, 0.05, False, 1, 8, 2, 10, 200, 100),
    "stablelm-2-1.6b": ("stabilityai/stablelm-2-1_6b", 32, 0.05, False, 1, 8, 4, 10, 200, 100),
}


def test_every_hub_folder_has_a_recipe():
    hub = [p.name for p in CONFIGS.iterdir() if (p / "lora.py").is_file() and p.name != "demo"]  # demo: test_demo
    assert sorted(hub) == sorted({**RECIPES, **OWN_RECIPES})


@pytest.mark.parametrize("folder", sorted({**RECIPES, **OWN_RECIPES}))
def test_recipe_matches_litgpt_and_validates(folder, tmp_path):
    ckpt, r, dropout, all_targets, micro, global_, epochs, warmup, save, eval_ = {**RECIPES, **OWN_RECIPES}[folder]
    cfg = load_config(CONFIGS / folder / "lora.py")
    assert cfg.checkpoint_dir == f"checkpoints/{ckpt}"
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (r, 16, dropout)
    on = {t for t in LORA_TARGETS if cfg[t]}
    assert on == (set(LORA_TARGETS) if all_targets else {"lora_query", "lora_value"})
    t = cfg.train
    assert (t.micro_batch_size, t.global_batch_size, t.epochs, t.max_steps) == (micro, global_, epochs, None)
    assert (t.lr_warmup_steps, t.save_interval, cfg.eval.interval) == (warmup, save, eval_)
    assert (t.max_seq_length, t.min_lr, t.log_interval, cfg.seed, cfg.precision) == (512, 6e-5, 1, 1337, "bf16-true")
    assert (cfg.data.name, cfg.data.val_split_fraction, cfg.data.prompt_style) == ("alpaca2k", 0.03847, "alpaca")
    o = cfg.optimizer
    assert (o.name, o.lr, o.weight_decay, o.betas) == ("adamw", 2e-4, 0.0, (0.9, 0.95))
    assert (cfg.eval.max_iters, cfg.eval.max_new_tokens, cfg.eval.final_validation) == (100, 100, True)

    cfg = load_config(CONFIGS / folder / "lora.py", [f"checkpoint_dir={tmp_path}"])
    validate(cfg)
    assert accumulation_steps(cfg) == global_ // micro


def test_base_config_defaults():
    cfg = base_config()
    assert cfg.checkpoint_dir is None and cfg.precision is None and cfg.resume is False
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.epochs) == (16, 1, 5)
    assert (cfg.train.lr_warmup_steps, cfg.train.save_interval, cfg.eval.interval) == (100, 1000, 100)
    assert (cfg.train.grad_accumulation, cfg.train.remat) == ("scan", "none")
    assert dict(cfg.mesh) == {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_parse_as_the_field_type():
    cfg = apply_overrides(base_config(), [
        "train.micro_batch_size=2", "--config.optimizer.lr=1", "optimizer.betas=(0.8,0.99)",
        "eval.final_validation=false",
        "train.epochs=None", "train.max_steps=100", "train.max_norm=1.0", "data.name=json", "precision=32-true",
    ])
    assert cfg.train.micro_batch_size == 2 and type(cfg.train.micro_batch_size) is int
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.betas == (0.8, 0.99)
    assert cfg.eval.final_validation is False
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.max_norm) == (None, 100, 1.0)
    assert (cfg.data.name, cfg.precision) == ("json", "32-true")


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("true", True), ("False", False),
                                         ("out/run/checkpoints/5", "out/run/checkpoints/5")])
def test_resume_takes_bool_auto_or_path(text, value):
    assert apply_overrides(base_config(), [f"resume={text}"]).resume == value


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=None", "train.micro_batch_size cannot be None"),
    ("train.micro_batch_size=two", "train.micro_batch_size takes an integer, got 'two'"),
    ("train.micro_batch_size=2.5", "takes an integer"),
    ("eval.final_validation=maybe", "takes true or false"),
    ("optimizer.betas=0.9", "takes a tuple"),
    ("train.micro_bach_size=2", "unknown config key 'train.micro_bach_size'; did you mean 'train.micro_batch_size'?"),
    ("micro_batch_size=2", "did you mean 'train.micro_batch_size'?"),
    ("train=2", "'train' is a group of settings"),
    ("train.epochs", "has no value"),
])
def test_bad_override(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(base_config(), [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="the config file nope/lora.py does not exist"):
        load_config("nope/lora.py")


# --- validation: one test per bad config -------------------------------------------------------


@pytest.fixture
def cfg(tmp_path):
    return apply_overrides(base_config(), [f"checkpoint_dir={tmp_path}"])


def _fails(cfg, message, **kwargs):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, **kwargs)


def test_base_config_with_a_checkpoint_validates(cfg):
    validate(cfg)


def test_missing_checkpoint_dir():
    _fails(base_config(), "checkpoint_dir is not set; pass --config.checkpoint_dir=DIR")


def test_checkpoint_dir_that_does_not_exist(cfg, tmp_path):
    cfg.checkpoint_dir = str(tmp_path / "gone")
    _fails(cfg, f"checkpoint_dir {tmp_path / 'gone'} does not exist")


def test_epochs_and_max_steps_both_set(cfg):
    cfg.train.max_steps = 100
    _fails(cfg, "train.epochs=5 and train.max_steps=100 are both set; keep one, e.g. --config.train.epochs=None")


def test_epochs_and_max_steps_both_none(cfg):
    cfg.train.epochs = None
    _fails(cfg, "train.epochs and train.max_steps are both None")


def test_global_batch_not_divisible_by_micro_batch(cfg):
    cfg.train.micro_batch_size = 3
    _fails(cfg, "train.global_batch_size=16 is not a multiple of train.micro_batch_size=3 = 3, so the accumulation "
                "steps are not a whole number; set train.global_batch_size to 15 or 18, or train.micro_batch_size to 4")


def test_global_batch_not_divisible_by_data_parallel_micro_batch(cfg):
    cfg.train.micro_batch_size = 3
    _fails(cfg, "data-parallel size 2 x train.micro_batch_size=3 = 6, so the accumulation steps are not a whole "
                "number; set train.global_batch_size to 12 or 18, or train.micro_batch_size to 4 (a divisor of 8)",
           data_parallel_size=2)


def test_global_batch_smaller_than_micro_batch(cfg):
    cfg.train.update(global_batch_size=4, micro_batch_size=8)
    _fails(cfg, "set train.global_batch_size to 8, or train.micro_batch_size to 4")


def test_accumulation_steps_counts_data_parallel_size(cfg):
    cfg.train.update(global_batch_size=16, micro_batch_size=2)
    assert accumulation_steps(cfg, 2) == 4


def test_save_interval_not_a_multiple_of_eval_interval(cfg):
    cfg.train.save_interval = 250
    _fails(cfg, "train.save_interval=250 is not a multiple of eval.interval=100, so a saved step would lack a "
                "validation loss; set train.save_interval to 200 or eval.interval to 50")


def test_negative_lora_r(cfg):
    cfg.lora_r = -1
    _fails(cfg, "lora_r must be an integer >= 0, got -1")


def test_non_positive_lora_alpha(cfg):
    cfg.lora_alpha = 0
    _fails(cfg, "lora_alpha must be > 0, got 0")


def test_lora_dropout_out_of_range(cfg):
    cfg.lora_dropout = 1.0
    _fails(cfg, "lora_dropout must be in [0, 1), got 1.0")


def test_no_lora_target(cfg):
    cfg.lora_query = cfg.lora_value = False
    _fails(cfg, "every LoRA target is off, so nothing would train")


def test_unknown_precision(cfg):
    cfg.precision = "bf16"
    _fails(cfg, "unknown precision 'bf16' (did you mean 'bf16-true'?); choose one of bf16-true, bf16-mixed")


def test_bf16_on_a_backend_without_it(cfg):
    cfg.precision = "bf16-true"
    _fails(cfg, "precision 'bf16-true' needs bfloat16, which this backend lacks; set --config.precision=16-mixed",
           backend_supports_bf16=False)


def test_unknown_optimizer(cfg):
    cfg.optimizer.name = "adamw8bit"
    _fails(cfg, "unknown optimizer.name 'adamw8bit' (did you mean 'adamw'?); choose one of adamw, adam, sgd")


def test_optimizer_name_is_case_insensitive(cfg):
    cfg.optimizer.name = "AdamW"
    validate(cfg)


def test_max_seq_length_above_model_context(cfg):
    cfg.train.max_seq_length = 4096
    _fails(cfg, "train.max_seq_length=4096 exceeds the model's context of 2048 tokens; "
                "set --config.train.max_seq_length=2048 or less", model_block_size=2048)


def test_warmup_steps_and_fraction_both_set(cfg):
    cfg.train.lr_warmup_fraction = 0.1
    _fails(cfg, "train.lr_warmup_steps=100 and train.lr_warmup_fraction=0.1 are both set; keep one, "
                "e.g. --config.train.lr_warmup_steps=None")


def test_warmup_fraction_alone_validates(cfg):
    apply_overrides(cfg, ["train.lr_warmup_steps=None", "train.lr_warmup_fraction=0.1"])
    validate(cfg)


@pytest.mark.parametrize("key", ["train.micro_batch_size", "train.global_batch_size", "train.save_interval",
                                 "train.log_interval", "eval.interval", "eval.max_iters"])
def test_non_positive_sizes_and_intervals(cfg, key):
    apply_overrides(cfg, [f"{key}=0"])
    _fails(cfg, f"{key} must be a positive integer, got 0")


def test_unknown_grad_accumulation(cfg):
    cfg.train.grad_accumulation = "loop"
    _fails(cfg, "unknown train.grad_accumulation 'loop'; choose one of scan, multisteps")


def test_unknown_remat(cfg):
    cfg.train.remat = "dots_savable"
    _fails(cfg, "unknown train.remat 'dots_savable' (did you mean 'dots_saveable'?)")


def test_remat_policy_name_validates(cfg):
    cfg.train.remat = "dots_with_no_batch_dims_saveable"
    validate(cfg)


def test_bad_mesh_axis_size(cfg):
    cfg.mesh.fsdp = 0
    _fails(cfg, "mesh.fsdp must be a positive integer or -1 (the remaining devices), got 0")


def test_bad_router_aux_loss_coef(cfg):
    cfg.train.router_aux_loss_coef = -0.01
    _fails(cfg, "train.router_aux_loss_coef must be a number >= 0 (0: off), got -0.01")


def test_two_mesh_axes_fill(cfg):
    cfg.mesh.tensor = -1
    _fails(cfg, "mesh.data and mesh.tensor are all -1; at most one mesh axis may take the remaining devices")


# --- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def finetune_calls(monkeypatch):
    """Replaces jaxlora.finetune with a stub that records the configs finetune() gets."""
    calls = []
    monkeypatch.setitem(sys.modules, "jaxlora.finetune", types.SimpleNamespace(finetune=calls.append))
    return calls


def _exit_code(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_cli_unknown_key_exits_2_with_one_line(capsys, finetune_calls):
    code = _exit_code(["finetune", f"--config={CONFIGS}/tiny-llama/lora.py", "--config.train.micro_bach_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and not finetune_calls
    assert err.count("\n") == 1 and err.startswith("error: unknown config key 'train.micro_bach_size'")
    assert "did you mean 'train.micro_batch_size'?" in err


def test_cli_invalid_config_exits_2(capsys, finetune_calls):
    assert _exit_code(["finetune", f"--config={CONFIGS}/tiny-llama/lora.py"]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint_dir checkpoints/TinyLlama/")


def test_cli_max_steps_instead_of_epochs(tmp_path, finetune_calls):
    assert cli.main(["finetune", f"--config={CONFIGS}/tiny-llama/lora.py", f"--config.checkpoint_dir={tmp_path}",
                     "--config.train.epochs=None", "--config.train.max_steps", "100",
                     "--config.train.micro_batch_size=2"]) == 0
    (cfg,) = finetune_calls
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.checkpoint_dir) == (None, 100, str(tmp_path))
    assert cfg.train.micro_batch_size == 2 and type(cfg.train.micro_batch_size) is int
    assert cfg.lora_r == 32  # the recipe's value survives


def test_cli_unknown_command_and_argument(capsys):
    assert _exit_code(["tune"]) == 2
    assert _exit_code(["finetune", "--lr=1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unknown command 'tune'; choose one of finetune, merge, export-peft, generate, chat, evaluate",
        "error: unknown argument '--lr=1'; use --config=FILE and --config.KEY=VALUE flags",
    ]


def test_cli_help_prints_usage_and_config(capsys):
    assert cli.main(["finetune", "--help", "--config.lora_r=4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxlora <command>") and "lora_r: 4" in out


@pytest.mark.parametrize("value", [0, 7])
def test_non_negative_ignore_index(cfg, value):
    cfg.data.ignore_index = value
    _fails(cfg, f"data.ignore_index must be a negative integer (labels >= 0 are token ids), got {value}")


def test_resume_changes_sorts_safe_from_unsafe(tmp_path):
    from jaxlora.config import resume_changes

    saved = json.loads(base_config().to_json_best_effort())
    saved["checkpoint_dir"] = str(tmp_path)

    def changes(**edits):
        current = base_config()
        current.checkpoint_dir = str(tmp_path / "." / "")  # the same directory, spelt otherwise
        current.update_from_flattened_dict(edits)
        return resume_changes(saved, json.loads(current.to_json_best_effort()))

    assert changes() == ([], [])
    assert changes(**{"eval.interval": 50, "train.max_steps": 9}) == (
        [], ["eval.interval 100 -> 50", "train.max_steps None -> 9"])
    assert changes(**{"train.micro_batch_size": 2}) == ([], ["train.micro_batch_size 1 -> 2"])  # scan: same gradient
    unsafe, _ = changes(**{"lora_r": 4, "optimizer.lr": 1e-3, "data.seed": 1})
    assert unsafe == ["data.seed 42 -> 1", "lora_r 8 -> 4", "optimizer.lr 0.0002 -> 0.001"]
    saved["train"]["grad_accumulation"] = "multisteps"
    unsafe, _ = changes(**{"train.grad_accumulation": "multisteps", "train.micro_batch_size": 2})
    assert unsafe == ["train.micro_batch_size 1 -> 2"]  # a mean of per-micro-batch means: the split matters
