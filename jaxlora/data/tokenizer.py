"""Tokenizer of a checkpoint directory: HF ``tokenizer.json`` or sentencepiece ``tokenizer.model``.

The BOS/EOS rules follow LitGPT's ``litgpt/tokenizer.py``:

* ``tokenizer.json`` wins over ``tokenizer.model`` when a directory has both.
* ``tokenizer.json``: BOS/EOS come from ``tokenizer_config.json`` (``bos_token``/``eos_token``),
  then ``generation_config.json`` (``bos_token_id``/``eos_token_id``), then ``config.json``.
  ``tokenizer.model``: from the sentencepiece model, falling back to the same files.
* Whether ``encode`` prepends BOS by default: Llama-3 checkpoints (directory name starting with
  ``Meta-Llama-3`` or ``Llama-3``) and SmolLM2 instruct checkpoints always do; otherwise
  ``add_bos_token`` from ``tokenizer_config.json``; otherwise only Llama tokenizers
  (``tokenizer_class`` ``LlamaTokenizer``; we also accept ``LlamaTokenizerFast``, which
  transformers treats the same way). Without ``tokenizer_config.json``: no BOS.

Deviations from LitGPT: ``generation_config.json`` may list several EOS ids (Llama 3 instruct
models do); ``eos_id`` is the first and ``eos_ids`` holds all of them (stop tokens for
generation). ``encode`` asks the HF backend for ids without its template special tokens and adds
BOS itself, so a prompt that already starts with the BOS text (the llama3 prompt style) does not
get a second BOS.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora import storage
from jaxlora.errors import CheckpointError

_LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file does not exist.

    Trailing commas (a known defect of some published ``generation_config.json`` files) are
    removed with a warning before giving up on the file.
    """
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as first_error:
        try:
            fixed = json.loads(re.sub(r",(\s*[}\]])", r"\1", text))
        except json.JSONDecodeError:
            raise CheckpointError(f"{path} is not valid JSON ({first_error}).") from None
        warnings.warn(f"{path} has trailing commas; read it after removing them.", stacklevel=3)
        return fixed


def _token_content(token: Any) -> str | None:
    """The text of a special token given as a string or as ``{"content": ...}``."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _first_id(value: Any) -> int | None:
    """An id given as an int or a list of ints (the first one), or None."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


class Tokenizer:
    """Encodes text to int32 ids and back, with the checkpoint's BOS/EOS conventions.

    Attributes:
        backend: ``"huggingface"`` (``tokenizer.json``) or ``"sentencepiece"`` (``tokenizer.model``).
        model_name: the checkpoint directory name (LitGPT chooses the prompt style and BOS rule from it).
        bos_id, eos_id, pad_id: special token ids; each may be None when the checkpoint has none.
        eos_ids: every EOS id the checkpoint declares, ``eos_id`` first (empty if there is none).
        use_bos: whether ``encode(..., bos=None)`` prepends BOS.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        checkpoint_dir = storage.local_checkpoint(checkpoint_dir, weights=False)  # a URL: mirrored locally
        if not checkpoint_dir.is_dir():
            raise CheckpointError(f"The checkpoint directory {checkpoint_dir} does not exist.")
        self.model_name = checkpoint_dir.name
        tokenizer_config = _read_json(checkpoint_dir / "tokenizer_config.json")
        generation_config = _read_json(checkpoint_dir / "generation_config.json") or {}
        model_config = _read_json(checkpoint_dir / "config.json") or {}

        bos_id = eos_id = pad_id = None
        eos_ids: list[int] = []
        if (json_path := checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            self._hf = HFTokenizer.from_file(str(json_path))
            if tokenizer_config:
                bos_id = self._config_token_id(tokenizer_config, "bos_token")
                eos_id = self._config_token_id(tokenizer_config, "eos_token")
                pad_id = self._config_token_id(tokenizer_config, "pad_token")
        elif (model_path := checkpoint_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self.backend = "sentencepiece"
            self._sp = SentencePieceProcessor(model_file=str(model_path))
            sp_ids = (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
            bos_id, eos_id, pad_id = (i if i >= 0 else None for i in sp_ids)
        else:
            raise CheckpointError(
                f"The checkpoint directory {checkpoint_dir} has neither tokenizer.json nor tokenizer.model."
            )

        for fallback in (generation_config, model_config):
            bos_id = bos_id if bos_id is not None else _first_id(fallback.get("bos_token_id"))
            pad_id = pad_id if pad_id is not None else _first_id(fallback.get("pad_token_id"))
            declared_eos = fallback.get("eos_token_id")
            declared_eos = declared_eos if isinstance(declared_eos, list) else [declared_eos]
            eos_ids += [i for i in declared_eos if i is not None]
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id if eos_id is not None else (eos_ids[0] if eos_ids else None)
        self.pad_id: int | None = pad_id
        declared = [self.eos_id] if self.eos_id is not None else []
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(declared + eos_ids))
        self.use_bos = self._uses_bos(tokenizer_config)

    def _config_token_id(self, tokenizer_config: dict[str, Any], key: str) -> int | None:
        token = _token_content(tokenizer_config.get(key))
        return self.token_to_id(token) if token is not None else None

    def _uses_bos(self, tokenizer_config: dict[str, Any] | None) -> bool:
        if tokenizer_config is None:
            return False
        if self.model_name.startswith(("Meta-Llama-3", "Llama-3")):
            return True
        if self.model_name.startswith("SmolLM2") and self.model_name.endswith("Instruct"):
            return True
        if "add_bos_token" in tokenizer_config:
            return bool(tokenizer_config["add_bos_token"])
        return tokenizer_config.get("tokenizer_class") in _LLAMA_TOKENIZER_CLASSES

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (HF: without added tokens, as LitGPT)."""
        if self.backend == "huggingface":
            return self._hf.get_vocab_size(with_added_tokens=False)
        return self._sp.vocab_size()

    def token_to_id(self, token: str) -> int | None:
        """The id of one token (HF added tokens included), or None if the vocabulary lacks it."""
        if self.backend == "huggingface":
            return self._hf.token_to_id(token)
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def encode(
        self, text: str, bos: bool | None = None, eos: bool = False, max_length: int | None = None
    ) -> np.ndarray:
        """Token ids of ``text``: int32 ``[n]``.

        Args:
            bos: prepend BOS (not twice); False strips a BOS the text itself produced;
                None follows the checkpoint's rule (``use_bos``).
            eos: append EOS (not twice); False strips a trailing EOS.
            max_length: keep only the first ``max_length`` ids (None or <= 0: all).
        """
        if self.backend == "huggingface":
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        if bos or (bos is None and self.use_bos):
            if self.bos_id is None:
                raise CheckpointError(f"The tokenizer of {self.model_name} has no BOS token to prepend.")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        elif ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if eos:
            if self.eos_id is None:
                raise CheckpointError(f"The tokenizer of {self.model_name} has no EOS token to append.")
            if not ids or ids[-1] != self.eos_id:
                ids = ids + [self.eos_id]
        elif ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        if max_length is not None and max_length > 0:
            ids = ids[:max_length]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """Text of ``ids`` (a scalar, list or 1-D array; special tokens are dropped)."""
        token_ids = np.asarray(ids).reshape(-1).astype(np.int64).tolist()
        if self.backend == "huggingface":
            return self._hf.decode(token_ids)
        return self._sp.decode(token_ids)
