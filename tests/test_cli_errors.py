"""The bad-input catalogue of the commands: each case exits with code 2 and one line `error: ...` on stderr
that names the problem, writes nothing and leaves its inputs as they were (no traceback, nothing half-written).

The cases run against the embedded demo (demo/base, demo/data): small enough that a case that gets past
its check would still finish quickly, so a missing check fails the case instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from jaxlora import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
RECIPE = REPO / "configs" / "finetune" / "demo" / "lora.py"


def _digest(path: Path) -> str:
    """A digest of a file or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fails(capsys, argv: list[str], pattern: str, *, untouched: tuple[Path, ...] = (), absent: tuple[Path, ...] = ()):
    """Run the CLI: exit code 2, a single `error:` line matching `pattern`, inputs unchanged, outputs absent."""
    before = {p: _digest(p) for p in untouched}
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    assert re.search(pattern, err[-1]), err[-1]
    for p, digest in before.items():
        assert _digest(p) == digest, f"{p} changed"
    for p in absent:
        assert not p.exists(), f"{p} was written"


def _finetune(*overrides: str) -> list[str]:
    return ["finetune", f"--config={RECIPE}", "--config.train.max_steps=1", *overrides]


def test_out_dir_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("keep me")
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'f'}"), r"out_dir .*/f is a file, not a directory",
          untouched=(tmp_path / "f",))


def test_out_dir_cannot_be_created(capsys, tmp_path):
    (tmp_path / "f").write_text("keep me")
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'f' / 'run'}"), r"cannot be created: .*/f is a file",
          untouched=(tmp_path / "f",))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_data_file_not_utf8(capsys, tmp_path, suffix):
    data = tmp_path / f"data{suffix}"
    record = b'{"instruction": "caf\xe9", "output": "x"}'
    data.write_bytes(b"[" + record + b"]" if suffix == ".json" else b'{"instruction": "a", "output": "b"}\n' + record)
    offset = data.read_bytes().index(b"\xe9")
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'out'}", f"--config.data.json_path={data}"),
          rf"data{suffix} is not UTF-8 text: byte 0xe9 at offset {offset} ", untouched=(data,),
          absent=(tmp_path / "out",))


# ---------------------------------------------------------------------------------------------
# Shared inputs: LoRA adapters of the demo base (built once), a writable copy of the base


BASE = DEMO / "base"
DATA = DEMO / "data"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{"run": a finetune out_dir (final/lora.safetensors), "lora": that file, "peft": a PEFT adapter dir} of the
    demo base with rank-2 query/value adapters (random A, zero B), written without training."""
    import dataclasses
    import json

    import numpy as np
    from flax import nnx
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    import jaxlora

    root = tmp_path_factory.mktemp("adapters")
    model = jaxlora.load_model(BASE, lora=jaxlora.LoRAConfig(r=2, alpha=4, query=True, value=True))
    jaxlora.save_peft_adapter(model, root / "peft")
    flat = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), sep=".")
    (root / "run" / "final").mkdir(parents=True)
    lora = root / "run" / "final" / "lora.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(lora),
              metadata={"lora": json.dumps(dataclasses.asdict(model.lora))})
    return {"run": root / "run", "lora": lora, "peft": root / "peft"}


@pytest.fixture(scope="module")
def base_copy(tmp_path_factory):
    """A copy of demo/base for the cases whose mistake is an output inside it (a missed check writes there)."""
    import shutil

    path = tmp_path_factory.mktemp("copy") / "base"
    shutil.copytree(BASE, path)
    return path


def _copy_base(tmp_path: Path, name: str = "base") -> Path:
    import shutil

    return Path(shutil.copytree(BASE, tmp_path / name))


def _rewrite_safetensors(src: Path, dst: Path, *, tensors=None, metadata=None) -> Path:
    """`src` written to `dst` with its {name: array} passed through `tensors` and its metadata through `metadata`."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="numpy") as f:
        meta, arrays = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file((tensors or (lambda t: t))(arrays), str(dst), metadata=(metadata or (lambda m: m))(meta))
    return dst


def _edit_json(path: Path, **changes) -> None:
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---------------------------------------------------------------------------------------------
# finetune: the config (refused before anything is loaded)


@pytest.mark.parametrize("override, pattern", [
    ("--config.train.max_stepz=2", r"unknown config key 'train\.max_stepz'; did you mean 'train\.max_steps'\?"),
    ("--config.train.micro_batch_size=two", r"train\.micro_batch_size takes an integer, got 'two'"),
    ("--config.precision=bf32", r"unknown precision 'bf32'"),
    ("--config.lora_r=-1", r"lora_r must be an integer >= 0, got -1"),
    ("--config.train.epochs=1", r"train\.epochs=1 and train\.max_steps=1 are both set"),
    ("--config.train.save_interval=150", r"train\.save_interval=150 is not a multiple of eval\.interval=200"),
    ("--config.train.micro_batch_size=3",
     r"train\.global_batch_size=16 is not a multiple of train\.micro_batch_size=3"),
    ("--config.train.max_seq_length=4096", r"train\.max_seq_length=4096 exceeds the model's context of 512 tokens"),
    ("--config.checkpoint_dir=None", r"checkpoint_dir is not set"),
    ("--config.train.max_steps", r"--config\.train\.max_steps needs a value"),
    ("--max_steps=3", r"unknown argument '--max_steps=3'"),
], ids=["unknown-key", "wrong-type", "precision", "lora-r-negative", "epochs-and-max-steps", "save-interval",
        "global-batch", "max-seq-length-over-context", "no-checkpoint-dir", "flag-without-value", "unknown-flag"])
def test_finetune_bad_config(capsys, tmp_path, override, pattern):
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'out'}", override), pattern, absent=(tmp_path / "out",))


def test_finetune_checkpoint_dir_missing(capsys, tmp_path):
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'out'}", f"--config.checkpoint_dir={tmp_path / 'nope'}"),
          r"checkpoint_dir .*/nope does not exist", absent=(tmp_path / "out",))


def test_finetune_config_file_missing(capsys, tmp_path):
    fails(capsys, ["finetune", f"--config={tmp_path / 'lora.py'}"], r"the config file .*/lora\.py does not exist")


# ---------------------------------------------------------------------------------------------
# Data files and directories: the data layer names the file and the record


_RECORD = '{"instruction": "a", "output": "b"}'


@pytest.mark.parametrize("name, text, pattern", [
    ("data.json", '{"instruction": "a", "output": "b"}', r"data\.json must hold a JSON list of records, not a dict"),
    ("data.json", '[{"instruction": "a"}]', r"Record 1 of .*/data\.json has no 'output' field"),
    ("data.json", '[{"instruction": "a", "output": 3}]', r"'output' field in record 1 of .*data\.json is of type int"),
    ("data.jsonl", _RECORD + "\n{oops\n", r"Line 2 of .*/data\.jsonl is not valid JSON"),
    ("data.jsonl", "", r"The data file .*/data\.jsonl holds no records"),
    ("data.txt", _RECORD, r"The data file .*/data\.txt must end in \.json, \.jsonl or \.parquet"),
    ("data.json", f"[{_RECORD}]", r"The validation split of .*/data\.json is empty"),
], ids=["json-dict", "no-output", "output-not-string", "jsonl-bad-line", "empty-file", "txt-suffix", "one-record"])
def test_evaluate_bad_data(capsys, tmp_path, name, text, pattern):
    data = tmp_path / name
    data.write_text(text)
    fails(capsys, ["evaluate", f"--checkpoint_dir={BASE}", f"--data.json_path={data}"], pattern,
          untouched=(data, BASE))


def test_finetune_data_is_a_dict(capsys, tmp_path):
    data = tmp_path / "data.json"
    data.write_text('{"train": []}')
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'out'}", f"--config.data.json_path={data}"),
          r"data\.json must hold a JSON list of records, not a dict", untouched=(data,), absent=(tmp_path / "out",))


def test_finetune_data_dir_without_splits(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text(_RECORD)
    fails(capsys, _finetune(f"--config.out_dir={tmp_path / 'out'}", f"--config.data.json_path={tmp_path / 'data'}"),
          r"The data directory .*/data has no train\.json or train\.jsonl", untouched=(tmp_path / "data",),
          absent=(tmp_path / "out",))


def test_evaluate_data_path_missing(capsys, tmp_path):
    fails(capsys, ["evaluate", f"--checkpoint_dir={BASE}", f"--data.json_path={tmp_path / 'val.jsonl'}"],
          r"The data path .*/val\.jsonl does not exist")


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_mask_prompt_leaves_no_target(capsys, tmp_path, command):
    """With mask_prompt and sequences cut before any response starts, nothing would be trained or scored."""
    argv = (_finetune(f"--config.out_dir={tmp_path / 'out'}", "--config.train.max_seq_length=8")
            if command == "finetune" else
            ["evaluate", f"--checkpoint_dir={BASE}", f"--data.json_path={DATA}", "--data.mask_prompt=True",
             "--max_seq_length=8"])
    fails(capsys, argv, r"no train example keeps a token to compute the loss on: with mask_prompt=True every "
                        r"response starts after max_seq_length=8", untouched=(DATA,), absent=(tmp_path / "out",))


# ---------------------------------------------------------------------------------------------
# Base checkpoint directories


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _bad_header(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:20] = b"not a header"
    (d / "model.safetensors").write_bytes(bytes(data))


CHECKPOINT_CASES = {
    "no-config": (lambda d: (d / "config.json").unlink(), r"no config\.json found at .*/base/config\.json"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(),
                   r"no model\.safetensors or model\.safetensors\.index\.json in .*/base"),
    "truncated-weights": (_truncate, r"cannot read .*/base/model\.safetensors: .*header"),
    "corrupt-header": (_bad_header, r"cannot read .*/base/model\.safetensors: .*header"),
    "model-type": (lambda d: _edit_json(d / "config.json", model_type="mamba"),
                   r"unsupported model_type 'mamba' in config\.json"),
    "rope-type": (lambda d: _edit_json(d / "config.json", rope_scaling={"rope_type": "mrope", "factor": 2.0}),
                  r"unsupported rope_scaling rope_type 'mrope' in config\.json"),
    "no-tokenizer": (lambda d: (d / "tokenizer.model").unlink(),
                     r"checkpoint directory .*/base has neither tokenizer\.json nor tokenizer\.model"),
    "config-not-json": (lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
                        r".*/base/config\.json is not valid JSON"),
    "null-size": (lambda d: _edit_json(d / "config.json", num_hidden_layers=None),
                  r"config\.json of model_type 'llama' gives sizes that are not positive integers: n_layer=None"),
    "config-disagrees": (lambda d: _edit_json(d / "config.json", hidden_size=128),
                         r"tensor model\.layers\.0\.self_attn\.\w_proj\.weight has shape \[\d+, 256\] but the "
                         r"config\.json implies \[\d+, 128\]"),
}


@pytest.mark.parametrize("case, command", [
    ("no-config", "finetune"), ("no-config", "export-peft"), ("no-weights", "generate"), ("no-weights", "merge"),
    ("truncated-weights", "evaluate"), ("truncated-weights", "merge"), ("corrupt-header", "generate"),
    ("model-type", "export-peft"), ("model-type", "chat"), ("rope-type", "finetune"), ("no-tokenizer", "generate"),
    ("no-tokenizer", "evaluate"), ("config-disagrees", "generate"), ("config-not-json", "finetune"),
    ("config-not-json", "generate"), ("config-not-json", "export-peft"), ("null-size", "evaluate"),
])
def test_bad_checkpoint(capsys, tmp_path, adapters, case, command):
    mutate, pattern = CHECKPOINT_CASES[case]
    base = _copy_base(tmp_path)
    mutate(base)
    out = tmp_path / "out"
    argv = {
        "finetune": _finetune(f"--config.out_dir={out}", f"--config.checkpoint_dir={base}"),
        "merge": ["merge", f"--checkpoint_dir={base}", f"--adapter={adapters['peft']}", f"--out={out}"],
        "export-peft": ["export-peft", f"--checkpoint_dir={base}", f"--adapter={adapters['peft']}", f"--out={out}"],
        "generate": ["generate", f"--checkpoint_dir={base}", "--max_new_tokens=2"],
        "chat": ["chat", f"--checkpoint_dir={base}"],
        "evaluate": ["evaluate", f"--checkpoint_dir={base}", f"--data.json_path={DATA}", "--max_iters=1"],
    }[command]
    fails(capsys, argv, pattern, untouched=(base, adapters["peft"]), absent=(out,))


def test_merge_config_json_not_json(capsys, tmp_path, adapters):
    base = _copy_base(tmp_path)
    (base / "config.json").write_text('{"model_type": "llama",')
    fails(capsys, ["merge", f"--checkpoint_dir={base}", f"--adapter={adapters['run']}", f"--out={tmp_path / 'out'}"],
          r".*/base/config\.json is not valid JSON", untouched=(base, adapters["run"]), absent=(tmp_path / "out",))


@pytest.mark.parametrize("command", ["merge", "generate"])
def test_checkpoint_dir_missing(capsys, tmp_path, adapters, command):
    argv = [command, f"--checkpoint_dir={tmp_path / 'nope'}", f"--adapter={adapters['lora']}"]
    argv += [f"--out={tmp_path / 'out'}"] if command == "merge" else ["--max_new_tokens=2"]
    fails(capsys, argv, r"checkpoint directory .*/nope does not exist", untouched=(adapters["run"],),
          absent=(tmp_path / "out",))


# ---------------------------------------------------------------------------------------------
# Adapters that do not fit the base, or are not adapters


def _rank4(meta: dict) -> dict:
    import json

    return {**meta, "lora": json.dumps({**json.loads(meta["lora"]), "r": 4})}


def _key_on(meta: dict) -> dict:
    import json

    return {**meta, "lora": json.dumps({**json.loads(meta["lora"]), "key": True})}


def _two_layers(tensors: dict) -> dict:
    return {k: v[:2] for k, v in tensors.items()}  # the stacked [n_layer, ...] adapters of a 2-layer model


def _neox_names(tensors: dict) -> dict:  # a PEFT adapter trained on a GPT-NeoX base
    return {k.replace("model.layers.", "gpt_neox.layers.").replace("self_attn.q_proj", "attention.query_key_value")
            .replace("self_attn.v_proj", "attention.dense"): v for k, v in tensors.items()}


def _layer_7(tensors: dict) -> dict:  # a PEFT adapter of a deeper Llama
    return {k.replace("layers.3.", "layers.7."): v for k, v in tensors.items()}


ADAPTER_CASES = [
    ("lora-rank", "merge", r"lora\.safetensors: blocks\.attn\.[qv]\.adapter\.lora_a has shape \[4, 256, 2\] but the base "
                           r"checkpoint and the adapter's LoRA settings imply \[4, 256, 4\]"),
    ("lora-other-size", "generate", r"lora\.safetensors: blocks\.attn\.[qv]\.adapter\.lora_[ab] has shape \[2, \d+, \d+\]"),
    ("lora-missing-target", "export-peft",
     r"lora\.safetensors has no tensor for LoRA parameter blocks\.attn\.k\.adapter\.lora_a"),
    ("lora-no-metadata", "evaluate", r"lora\.safetensors has no 'lora' metadata"),
    ("lora-bad-run-config", "generate", r"lora\.safetensors has an unreadable run config in its metadata"),
    ("lora-truncated", "merge", r"cannot read .*/lora\.safetensors"),
    ("peft-other-family", "export-peft", r"adapts module gpt_neox\.layers\.0\.attention\.\w+, which jaxlora cannot "
                                         r"adapt for model_type 'llama'"),
    ("peft-layer-base-lacks", "generate", r"adapts module model\.layers\.7\.self_attn\.[qv]_proj, which jaxlora "
                                          r"cannot adapt"),
    # DoRA adapters load (test_dora); one that says use_dora but lacks the magnitudes is refused
    ("peft-dora", "merge", r"adapter_model\.safetensors has no lora_magnitude_vector for module model\.layers\.0\."),
    ("peft-config-not-json", "merge", r"adapter_config\.json is not valid JSON"),
    ("peft-bin-weights", "merge", r"no adapter_model\.safetensors in .*/adapter \(only safetensors PEFT adapters"),
]


@pytest.mark.parametrize("case, command, pattern", ADAPTER_CASES, ids=[f"{c}-{cmd}" for c, cmd, _ in ADAPTER_CASES])
def test_bad_adapter(capsys, tmp_path, adapters, case, command, pattern):
    import shutil

    adapter = tmp_path / "adapter"
    if case.startswith("lora"):
        file = adapter / "final" / "lora.safetensors"
        edits = {"lora-rank": dict(metadata=_rank4), "lora-other-size": dict(tensors=_two_layers),
                 "lora-missing-target": dict(metadata=_key_on), "lora-no-metadata": dict(metadata=lambda m: {}),
                 "lora-bad-run-config": dict(metadata=lambda m: {**m, "config": '{"precision": '})}
        _rewrite_safetensors(adapters["lora"], file, **edits.get(case, {}))
        if case == "lora-truncated":
            file.write_bytes(file.read_bytes()[:100])
    else:
        shutil.copytree(adapters["peft"], adapter)
        if case in ("peft-other-family", "peft-layer-base-lacks"):
            rename = _neox_names if case == "peft-other-family" else _layer_7
            _rewrite_safetensors(adapter / "adapter_model.safetensors", adapter / "adapter_model.safetensors",
                                 tensors=rename, metadata=lambda m: {"format": "pt"})  # as PEFT writes it
        elif case == "peft-dora":
            _edit_json(adapter / "adapter_config.json", use_dora=True)
        elif case == "peft-config-not-json":
            (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"')
        elif case == "peft-bin-weights":
            (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    out = tmp_path / "out"
    argv = {
        "merge": ["merge", f"--checkpoint_dir={BASE}", f"--adapter={adapter}", f"--out={out}"],
        "export-peft": ["export-peft", f"--checkpoint_dir={BASE}", f"--adapter={adapter}", f"--out={out}"],
        "generate": ["generate", f"--checkpoint_dir={BASE}", f"--adapter={adapter}", "--max_new_tokens=2"],
        "evaluate": ["evaluate", f"--checkpoint_dir={BASE}", f"--adapter={adapter}", f"--data.json_path={DATA}"],
    }[command]
    fails(capsys, argv, pattern, untouched=(adapter, BASE), absent=(out,))


@pytest.mark.parametrize("command", ["merge", "export-peft", "generate", "evaluate"])
def test_adapter_missing(capsys, tmp_path, command):
    argv = [command, f"--checkpoint_dir={BASE}", f"--adapter={tmp_path / 'run'}"]
    argv += {"generate": ["--max_new_tokens=2"], "evaluate": [f"--data.json_path={DATA}"]}.get(
        command, [f"--out={tmp_path / 'out'}"])
    fails(capsys, argv, r"adapter .*/run does not exist", absent=(tmp_path / "out",))


@pytest.mark.parametrize("command", ["merge", "chat"])
def test_adapter_dir_with_neither_format(capsys, tmp_path, command):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # e.g. a run that never finished
    argv = [command, f"--checkpoint_dir={BASE}", f"--adapter={tmp_path / 'run'}"]
    argv += [f"--out={tmp_path / 'out'}"] if command == "merge" else []
    fails(capsys, argv, r"no adapter found in .*/run: expected final/lora\.safetensors, lora\.safetensors or a PEFT "
                        r"adapter_config\.json", untouched=(tmp_path / "run",), absent=(tmp_path / "out",))


# ---------------------------------------------------------------------------------------------
# merge and export-peft outputs: refused before anything is loaded or written


def test_out_not_empty(capsys, tmp_path, adapters):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for command in ("merge", "export-peft"):
        out = tmp_path / "out"
        fails(capsys, [command, f"--checkpoint_dir={BASE}", f"--adapter={adapters['run']}", f"--out={out}"],
              r"out already exists and is not an empty directory", untouched=(tmp_path / "out", adapters["run"]))


@pytest.mark.parametrize("command, out, pattern", [
    ("merge", "base", r"--out .*/base is the --checkpoint_dir directory"),
    ("export-peft", "base/peft", r"--out .*/base/peft lies inside the --checkpoint_dir directory"),
    ("merge", "run/merged", r"--out .*/run/merged lies inside the --adapter directory .*/run"),
    ("export-peft", "run/final/peft", r"--out .*/run/final/peft lies inside the --adapter directory .*/run"),
    ("export-peft", "peft", r"--out .*/peft is the --adapter directory"),
], ids=["merge-into-base", "export-inside-base", "merge-inside-run", "export-inside-run", "export-onto-peft"])
def test_out_is_an_input(capsys, adapters, base_copy, command, out, pattern):
    inputs = {"base": base_copy, "run": adapters["run"], "peft": adapters["peft"]}
    first, *rest = out.split("/")
    out_path = inputs[first].joinpath(*rest)
    adapter = adapters["peft"] if first == "peft" else adapters["run"]
    fails(capsys, [command, f"--checkpoint_dir={base_copy}", f"--adapter={adapter}", f"--out={out_path}"], pattern,
          untouched=(base_copy, adapter), absent=(out_path,) if rest else ())


def test_out_is_a_file(capsys, tmp_path, adapters):
    (tmp_path / "f").write_text("keep me")
    fails(capsys, ["merge", f"--checkpoint_dir={BASE}", f"--adapter={adapters['run']}", f"--out={tmp_path / 'f'}"],
          r".*/f is a file, not a directory", untouched=(tmp_path / "f",))
    fails(capsys, ["export-peft", f"--checkpoint_dir={BASE}", f"--adapter={adapters['peft']}",
                   f"--out={tmp_path / 'f' / 'peft'}"], r".*/f/peft cannot be created: .*/f is a file",
          untouched=(tmp_path / "f",))


@pytest.mark.parametrize("flags, pattern", [
    (["--dtype=float13"], r"--dtype is 'float13', not a dtype merge can write"),
    (["--rank=2"], r"jaxlora merge: unrecognized arguments: --rank=2"),
    (["--adapter_dir=x"], r"jaxlora merge: unrecognized arguments: --adapter_dir=x"),
], ids=["dtype", "unknown-flag", "misspelt-flag"])
def test_merge_bad_flags(capsys, tmp_path, adapters, flags, pattern):
    fails(capsys, ["merge", f"--checkpoint_dir={BASE}", f"--adapter={adapters['run']}", f"--out={tmp_path / 'out'}",
                   *flags], pattern, untouched=(adapters["run"],), absent=(tmp_path / "out",))


def test_export_without_out(capsys, adapters):
    fails(capsys, ["export-peft", f"--checkpoint_dir={BASE}", f"--adapter={adapters['peft']}"],
          r"jaxlora export-peft: the following arguments are required: --out", untouched=(adapters["peft"],))


# ---------------------------------------------------------------------------------------------
# evaluate, generate and chat flags


@pytest.mark.parametrize("flags, pattern", [
    (["--batch_size=0"], r"--batch_size must be >= 1, got 0"),
    (["--max_iters=0"], r"--max_iters must be >= 1, got 0; leave it out for every batch"),
    (["--max_seq_length=-5"], r"--max_seq_length must be >= 1, got -5"),
    (["--max_seq_length=4096"], r"--max_seq_length=4096 exceeds the model's context of 512 tokens"),
    (["--split=test"], r"argument --split: invalid choice: 'test'"),
    (["--data.jsonpath=x"], r"unknown config key 'data\.jsonpath'; did you mean 'data\.json_path'\?"),
    (["--data.val_split_fraction=0"], r"val_split_fraction must lie strictly between 0 and 1, got 0\.0"),
    (["--batch=4"], r"unknown argument '--batch=4'; data settings are --data\.KEY=VALUE flags"),
], ids=["batch-size-0", "max-iters-0", "max-seq-length-negative", "max-seq-length-over-context", "split",
        "data-key", "val-split-fraction", "abbreviated-flag"])
def test_evaluate_bad_flags(capsys, flags, pattern):
    fails(capsys, ["evaluate", f"--checkpoint_dir={BASE}", f"--data.json_path={DATA / 'train.jsonl'}", *flags],
          pattern, untouched=(DATA,))


def test_evaluate_train_split_without_data(capsys):
    fails(capsys, ["evaluate", f"--checkpoint_dir={BASE}", "--split=train"],
          r"data\.name is 'json' but data\.json_path is not set")


@pytest.mark.parametrize("flags, pattern", [
    (["--max_new_tokens=0"], r"--max_new_tokens must be >= 1, got 0"),
    (["--prompt=" + "word " * 600], r"the prompt \(\d+ tokens\) plus max_new_tokens \(50\) exceeds the model's "
                                    r"context of 512 tokens"),
    (["--temperature=-1"], r"temperature must be >= 0 \(0 = greedy\), got -1\.0"),
    (["--top_p=2"], r"top_p must be in \(0, 1\], got 2\.0"),
    (["--top_k=-3"], r"--top_k must be >= 0 \(0: no top-k filter\), got -3"),
    (["--prompt_style=alpacca", "--max_new_tokens=2"], r"Unknown prompt style 'alpacca'"),
    (["--precision=bf16"], r"unknown precision 'bf16'"),
    (["--max_new_tokens=ten"], r"argument --max_new_tokens: invalid int value: 'ten'"),
    (["--max_tokens=5"], r"jaxlora generate: unrecognized arguments: --max_tokens=5"),
], ids=["max-new-tokens-0", "prompt-over-context", "temperature", "top-p", "top-k", "prompt-style", "precision",
        "int-flag", "unknown-flag"])
def test_generate_bad_flags(capsys, flags, pattern):
    fails(capsys, ["generate", f"--checkpoint_dir={BASE}", *flags], pattern)


@pytest.mark.parametrize("flags, pattern", [
    (["--max_new_tokens=0"], r"--max_new_tokens must be >= 1, got 0"),
    (["--prompt=hi"], r"jaxlora chat: unrecognized arguments: --prompt=hi"),  # not taken for --prompt_style
], ids=["max-new-tokens-0", "no-prompt-flag"])
def test_chat_bad_flags(capsys, monkeypatch, flags, pattern):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What do llamas eat?\n"))  # refused before the first message
    fails(capsys, ["chat", f"--checkpoint_dir={BASE}", *flags], pattern)


@pytest.mark.parametrize("argv, pattern", [
    ([], r"no command given; choose one of finetune, merge"),
    (["finetun"], r"unknown command 'finetun'; choose one of finetune"),
], ids=["no-command", "unknown-command"])
def test_bad_command(capsys, argv, pattern):
    fails(capsys, argv, pattern)


def test_peft_adapter_named_by_its_config_file(capsys, tmp_path, adapters):
    """Not a mistake: --adapter=DIR/adapter_config.json is the PEFT adapter DIR (it used to be read as safetensors)."""
    assert cli.main(["export-peft", f"--checkpoint_dir={BASE}", f"--adapter={adapters['peft'] / 'adapter_config.json'}",
                     f"--out={tmp_path / 'out'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
