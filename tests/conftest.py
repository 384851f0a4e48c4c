"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, HF model in eval mode) for every family of _hf_helpers.FAMILIES.

    Built once per session (parity and export tests read them; none may write into them).
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from _hf_helpers import FAMILIES, make_hf_model

    out = {}
    for name in FAMILIES:
        model = make_hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out
