"""Instruction records from local JSON/JSONL files and from named, downloadable datasets.

A record is Alpaca-form: ``{"instruction": str, "input": str, "output": str}`` (``input`` may be
empty). Local data (``name="json"``) is either one ``.json`` (a list of records) or ``.jsonl``
(one record a line) file, split into train/val with a seeded ``val_split_fraction``, or a
directory holding ``train.json(l)`` and ``val.json(l)``.

Named sets are downloaded once into ``<download_dir>/<name>/`` (see ``download.py``) and mapped
to Alpaca form. Their URLs are LitGPT's. No checksums are pinned: they could not be verified
offline when this was written (``sha256=None`` skips the check).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from jaxlora.data.download import download_if_missing
from jaxlora.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Record = dict[str, str]
RawRecord = tuple[str, Any]
"""(where it came from, e.g. "record 3 of train.json", the parsed JSON value)."""

DEFAULT_VAL_SPLIT_FRACTION = 0.05
"""For a single local file without ``val_split_fraction`` (LitGPT's JSON default)."""


def _read_raw(path: Path) -> list[RawRecord]:
    """Parsed records of a .json, .jsonl or .parquet file, each with its location for errors."""
    if not path.is_file():
        raise DataError(f"The data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(_utf8(path).splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {line_number} of {path}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"Line {line_number} of {path} is not valid JSON ({error.msg}).") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(_utf8(path))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of records, not a {type(data).__name__}.")
        return [(f"record {i} of {path}", item) for i, item in enumerate(data, start=1)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"Reading {path} needs the optional package pyarrow: pip install pyarrow.") from None
        rows = pyarrow.parquet.read_table(path).to_pylist()
        return [(f"row {i} of {path}", row) for i, row in enumerate(rows, start=1)]
    raise DataError(f"The data file {path} must end in .json, .jsonl or .parquet.")


def _utf8(path: Path) -> str:
    """The file's text; DataError naming the byte offset when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                        f"({error.reason}); save the file as UTF-8.") from None


def _text(raw: Any, where: str, field: str, *, required: bool = True) -> str:
    """The string ``raw[field]`` ("" for an absent optional field or a null)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where[0].upper()}{where[1:]} is of type {type(raw).__name__}, not a JSON object.")
    if field not in raw:
        if required:
            raise DataError(f"{where[0].upper()}{where[1:]} has no {field!r} field.")
        return ""
    value = raw[field]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"The {field!r} field in {where} is of type {type(value).__name__}, not a string.")
    return value


def alpaca_record(raw: Any, where: str) -> Record:
    """``instruction``, optional ``input``, ``output`` (Alpaca, AlpacaGPT4, local JSON)."""
    return {
        "instruction": _text(raw, where, "instruction"),
        "input": _text(raw, where, "input", required=False),
        "output": _text(raw, where, "output"),
    }


def dolly_record(raw: Any, where: str) -> Record:
    """Dolly: ``instruction``, ``context`` -> input, ``response`` -> output."""
    return {
        "instruction": _text(raw, where, "instruction"),
        "input": _text(raw, where, "context", required=False),
        "output": _text(raw, where, "response"),
    }


def longform_record(raw: Any, where: str) -> Record:
    """LongForm: ``input`` is the instruction, ``output`` the reply."""
    return {"instruction": _text(raw, where, "input"), "input": "", "output": _text(raw, where, "output")}


def lima_record(raw: Any, where: str) -> Record:
    """LIMA: the first two turns of ``conversations`` (LitGPT's default, no multi-turn)."""
    if not isinstance(raw, dict) or "conversations" not in raw:
        raise DataError(f"{where[0].upper()}{where[1:]} has no 'conversations' field.")
    turns = raw["conversations"]
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, str) for t in turns[:2]):
        raise DataError(f"The 'conversations' field in {where} needs at least two strings.")
    return {"instruction": turns[0], "input": "", "output": turns[1]}


def read_records(path: str | Path, to_record: Callable[[Any, str], Record] = alpaca_record) -> list[Record]:
    """The records of one data file in Alpaca form; ``DataError`` naming the file and record if not."""
    return [to_record(raw, where) for where, raw in _read_raw(Path(path))]


def split_records(records: list[Record], val_split_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded random (train, val) split; sizes as ``torch.utils.data.random_split`` with fractions."""
    if not 0.0 < val_split_fraction < 1.0:
        raise ConfigError(f"val_split_fraction must lie strictly between 0 and 1, got {val_split_fraction}.")
    n = len(records)
    n_train, n_val = int(np.floor((1.0 - val_split_fraction) * n)), int(np.floor(val_split_fraction * n))
    n_train += n - n_train - n_val > 0  # the remainder goes to the first split first
    order = np.random.default_rng(seed).permutation(n)
    return [records[i] for i in order[:n_train]], [records[i] for i in order[n_train:]]


def _find_split_file(directory: Path, split: str) -> Path:
    for suffix in (".json", ".jsonl"):
        if (path := directory / f"{split}{suffix}").is_file():
            return path
    raise DataError(f"The data directory {directory} has no {split}.json or {split}.jsonl.")


def _check_not_empty(train: list[Record], val: list[Record], source: str) -> None:
    for split, records in (("train", train), ("validation", val)):
        if not records:
            raise DataError(f"The {split} split of {source} is empty.")


def load_json_splits(
    json_path: str | Path, val_split_fraction: float | None = None, seed: int = 42
) -> tuple[list[Record], list[Record]]:
    """(train, val) records from a local file (split with ``val_split_fraction``) or directory."""
    if not json_path:
        raise ConfigError("data.name is 'json' but data.json_path is not set.")
    path = Path(json_path)
    if path.is_dir():
        if val_split_fraction is not None:
            logger.info("%s is a directory with its own splits: val_split_fraction is not used.", path)
        train = read_records(_find_split_file(path, "train"))
        val = read_records(_find_split_file(path, "val"))
    elif path.is_file():
        if val_split_fraction is None:
            logger.warning("No val_split_fraction set for %s: using %s.", path, DEFAULT_VAL_SPLIT_FRACTION)
            val_split_fraction = DEFAULT_VAL_SPLIT_FRACTION
        records = read_records(path)
        if not records:
            raise DataError(f"The data file {path} holds no records.")
        train, val = split_records(records, val_split_fraction, seed)
    else:
        raise DataError(f"The data path {path} does not exist (expected a file or a directory with train/val files).")
    _check_not_empty(train, val, str(path))
    return train, val


@dataclass(frozen=True)
class NamedDataset:
    """A downloadable instruction dataset.

    ``url`` is the file's URL, or, for sets that ship their own splits (``split_files``), the
    base URL the split file names are appended to (``file_name``, the cache name of a single file,
    is then None). ``val_split_fraction`` is the default for sets split here (LitGPT's value:
    e.g. exactly 2000 validation records for Alpaca).
    """

    url: str
    file_name: str | None
    to_record: Callable[[Any, str], Record]
    val_split_fraction: float | None = None
    split_files: tuple[str, str] | None = None
    sha256: str | None = None
    needs_token: bool = False


NAMED_DATASETS: dict[str, NamedDataset] = {
    "alpaca": NamedDataset(
        url="https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json",
        file_name="alpaca_data_cleaned_archive.json",
        to_record=alpaca_record,
        val_split_fraction=0.03865,
    ),
    "alpaca2k": NamedDataset(
        url=(
            "https://huggingface.co/datasets/mhenrichsen/alpaca_2k_test/resolve/"
            "refs%2Fconvert%2Fparquet/default/train/0000.parquet"
        ),
        file_name="alpaca_2k_test.parquet",
        to_record=alpaca_record,
        val_split_fraction=0.05,
    ),
    "alpacagpt4": NamedDataset(
        url="https://raw.githubusercontent.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM/main/data/alpaca_gpt4_data.json",
        file_name="alpaca_gpt4_data.json",
        to_record=alpaca_record,
        val_split_fraction=0.03847,
    ),
    "dolly": NamedDataset(
        url="https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
        file_name="databricks-dolly-15k.jsonl",
        to_record=dolly_record,
        val_split_fraction=0.1,
    ),
    "lima": NamedDataset(
        url="https://huggingface.co/datasets/GAIR/lima/resolve/main/train.jsonl",
        file_name="lima_train.jsonl",
        to_record=lima_record,
        val_split_fraction=0.1,
        needs_token=True,
    ),
    "longform": NamedDataset(
        url="https://raw.githubusercontent.com/akoksal/LongForm/main/dataset",
        file_name=None,
        to_record=longform_record,
        split_files=("train.json", "val.json"),
    ),
}


def _url_key(url: str) -> str:
    """A short stable key for a URL, naming the cache entry of an overriding URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:10]


def load_named_splits(
    name: str,
    *,
    download_dir: str | Path = "data",
    url: str | None = None,
    val_split_fraction: float | None = None,
    seed: int = 42,
) -> tuple[list[Record], list[Record]]:
    """(train, val) records of a named dataset, downloaded into ``download_dir/name`` if missing.

    Args:
        url: replaces the dataset's URL (for ``longform``: the base URL of train.json/val.json); a
            download from it is cached under its own name. ``HF_TOKEN`` is sent only for ``lima``.
        val_split_fraction: None takes the dataset's default; unused for sets with their own splits.
    """
    if name not in NAMED_DATASETS:
        known = ", ".join(["json", *NAMED_DATASETS])
        raise ConfigError(f"Unknown dataset {name!r}; the known datasets are: {known}.")
    spec = NAMED_DATASETS[name]
    cache_dir = Path(download_dir) / name
    token = (os.environ.get("HF_TOKEN") or None) if spec.needs_token else None
    if spec.split_files is not None:
        split_dir = cache_dir if url is None else cache_dir / f"url-{_url_key(url)}"
        base_url = (url or spec.url).rstrip("/")
        train, val = (
            read_records(download_if_missing(f"{base_url}/{file}", split_dir / file), spec.to_record)
            for file in spec.split_files
        )
    else:
        path = cache_dir / spec.file_name
        if url is not None:
            suffix = Path(urlparse(url).path).suffix or path.suffix
            path = cache_dir / f"{path.stem}-url-{_url_key(url)}{suffix}"
        if spec.needs_token and token is None and url is None and not path.is_file():
            raise ConfigError(f"The {name} dataset is gated on Hugging Face: set HF_TOKEN to an access token.")
        sha256 = spec.sha256 if url is None else None
        records = read_records(download_if_missing(url or spec.url, path, sha256=sha256, token=token), spec.to_record)
        if not records:
            raise DataError(f"The downloaded file {path} holds no records.")
        fraction = val_split_fraction if val_split_fraction is not None else spec.val_split_fraction
        train, val = split_records(records, fraction, seed)
    _check_not_empty(train, val, f"the {name} dataset")
    return train, val
