"""The ``jaxlora`` command: ``jaxlora <command> [--config=FILE] [--config.KEY=VALUE ...]``.

Thin by design: a command turns its flags into a config and calls the library. A user mistake
(any JaxloraError, raised here or deep in the library) prints ``error: <message>`` on one line to
stderr and exits with code 2, without a traceback. A new command is a function of its arguments
added to COMMANDS.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

import ml_collections

from jaxlora.commands import generate as generation
from jaxlora.commands import interop
from jaxlora.config import load_config, validate
from jaxlora.errors import ConfigError, JaxloraError

USAGE = """\
usage: jaxlora <command> [--config=FILE] [--config.KEY=VALUE ...]

commands:
{commands}

  --config=FILE       a Python file whose get_config() returns the config, e.g.
                      configs/finetune/tiny-llama/lora.py (default: jaxlora.config.base_config())
  --config.KEY=VALUE  set one field, parsed as the field's type, e.g. --config.train.micro_batch_size=2,
                      --config.train.epochs=None, --config.optimizer.betas=(0.9,0.95)
  --help              this text, and the config that FILE and the overrides give
"""


def config_from_args(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The config named by ``--config=FILE`` with the ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) overrides."""
    path, overrides = None, []
    args = iter(argv)
    for arg in args:
        flag, sep, value = arg.partition("=")
        if flag.startswith("--config.") or flag == "--config":
            if not sep:
                value = next(args, None)
                if value is None:
                    raise ConfigError(f"{flag} needs a value: {flag}=VALUE")
            if flag == "--config":
                path = value
            else:
                overrides.append(f"{flag.removeprefix('--config.')}={value}")
        else:
            raise ConfigError(f"unknown argument {arg!r}; use --config=FILE and --config.KEY=VALUE flags")
    return load_config(path, overrides)


def finetune(argv: Sequence[str]) -> None:
    """LoRA-finetune a model (LitGPT's finetune_lora)."""
    cfg = config_from_args(argv)
    # The loop validates again with the mesh's data-parallel size and the model's context length.
    validate(cfg)
    from jaxlora.finetune import finetune as run_finetune

    run_finetune(cfg)


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "finetune": finetune,
    "merge": interop.merge,
    "export-peft": interop.export_peft,
    "generate": generation.generate,
    "chat": generation.chat,
    "evaluate": generation.evaluate,
}


def _usage() -> str:
    commands = "\n".join(f"  {name:<18}{fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
    return USAGE.format(commands=commands)


def _help(argv: Sequence[str]) -> None:
    print(_usage())
    print(config_from_args([arg for arg in argv if arg not in ("-h", "--help")]))


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stdout` is when a record comes (it may be replaced, as pytest does)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    """`HH:MM:SS message`; warnings and errors also name their level and logger."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")
        self._warning = logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record) if record.levelno <= logging.INFO else self._warning.format(record)


def _log_to_stdout() -> None:
    """jaxlora's INFO lines (progress, metrics, results) and every library's warnings, once each, on stdout.

    The handler sits on the root logger: absl (used by orbax) adds a stderr handler of its own to a
    root logger that has none, which would print each line twice.
    """
    root = logging.getLogger()
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
    logging.getLogger("jaxlora").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit code 0 on success, 2 (``SystemExit``) on a user mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _log_to_stdout()
    try:
        if not argv:
            print(_usage(), file=sys.stderr)
            raise ConfigError(f"no command given; choose one of {', '.join(COMMANDS)}")
        name, rest = argv[0], argv[1:]
        if name in ("-h", "--help", "help"):
            print(_usage())
            return 0
        if name not in COMMANDS:
            raise ConfigError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
        if name == "finetune" and ("-h" in rest or "--help" in rest):  # other commands: argparse's help
            _help(rest)
        else:
            COMMANDS[name](rest)
    except JaxloraError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
