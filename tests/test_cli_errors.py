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
