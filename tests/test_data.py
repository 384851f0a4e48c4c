"""Datasets: local JSON/JSONL, named downloads from a local HTTP server, tokenizing, batching."""

import hashlib
import http.server
import json
import logging
import threading
from collections import Counter

import numpy as np
import pytest
from _data_helpers import LLAMA2_TOKENIZER_CONFIG, make_sentencepiece_dir
from ml_collections import ConfigDict

from jaxlora.data.batches import BatchIterator, eval_batches, steps_per_epoch
from jaxlora.data.download import download_if_missing
from jaxlora.data.prompts import PromptStyle
from jaxlora.data.sft import effective_seq_length, load_sft_splits, tokenize_record, tokenize_records
from jaxlora.data.sources import load_json_splits, load_named_splits, read_records
from jaxlora.data.tokenizer import Tokenizer
from jaxlora.errors import ConfigError, DataError


def _records(n, start=0):
    return [
        {
            "instruction": f"Say the number {i}.",
            "input": "in words" if i % 3 == 0 else "",
            "output": f"number {i} " * (i % 5 + 1),
        }
        for i in range(start, start + n)
    ]


def _write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _assert_one_sentence(error):
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message, message


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(make_sentencepiece_dir(tmp_path_factory.mktemp("ckpt") / "Llama-2-tiny", LLAMA2_TOKENIZER_CONFIG))


# --- local files -------------------------------------------------------------------------------


def test_json_file_split_is_seeded_and_disjoint(tmp_path):
    path = _write(tmp_path / "data.json", _records(40))
    train, val = load_json_splits(path, 0.25, seed=1)
    assert (len(train), len(val)) == (30, 10)
    assert sorted(r["instruction"] for r in train + val) == sorted(r["instruction"] for r in _records(40))
    assert (train, val) == load_json_splits(path, 0.25, seed=1)
    assert val != load_json_splits(path, 0.25, seed=2)[1]


def test_jsonl_file_and_split_directory(tmp_path, caplog):
    path = _write(tmp_path / "data.jsonl", _records(20))
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # blank lines are skipped
    with caplog.at_level(logging.WARNING):
        train, val = load_json_splits(path, None, seed=0)
    assert (len(train), len(val)) == (19, 1) and "using 0.05" in caplog.text
    directory = tmp_path / "splits"
    directory.mkdir()
    _write(directory / "train.jsonl", _records(6))
    _write(directory / "val.json", [{"instruction": "x", "output": "y", "input": None}])
    train, val = load_json_splits(directory, 0.5, seed=0)
    assert train == [dict(r) for r in _records(6)] and val == [{"instruction": "x", "input": "", "output": "y"}]


@pytest.mark.parametrize(
    "file_name, content, message",
    [
        ("bad.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction" "c"}\n]', r"bad\.json is not valid JSON .*line 3"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', r"^Line 2 of .*bad\.jsonl is not valid JSON"),
        ("field.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"^Record 2 of .*field\.json has no 'output'"),
        ("type.jsonl", '{"instruction": 3, "output": "b"}\n', r"'instruction' field in line 1 of .*type\.jsonl is of type int"),
        ("list.json", '[["a", "b"]]', r"^Record 1 of .*list\.json is of type list, not a JSON object"),
        ("object.json", '{"instruction": "a", "output": "b"}', r"must hold a JSON list of records, not a dict"),
        ("empty.json", "[]", r"empty\.json holds no records"),
        ("data.csv", "a,b", r"must end in \.json, \.jsonl or \.parquet"),
    ],
)
def test_bad_file_is_one_sentence(tmp_path, file_name, content, message):
    (tmp_path / file_name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        load_json_splits(tmp_path / file_name, 0.5, seed=0)
    _assert_one_sentence(error)


def test_missing_data_and_empty_splits(tmp_path):
    with pytest.raises(DataError, match="does not exist") as error:
        load_json_splits(tmp_path / "nope.json", 0.1)
    _assert_one_sentence(error)
    _write(tmp_path / "train.json", _records(3))
    with pytest.raises(DataError, match=r"has no val\.json or val\.jsonl"):
        load_json_splits(tmp_path)
    _write(tmp_path / "val.json", [])
    with pytest.raises(DataError, match="validation split of .* is empty"):
        load_json_splits(tmp_path)
    with pytest.raises(DataError, match="validation split of .* is empty"):
        load_json_splits(tmp_path / "train.json", 0.1)  # 10% of 3 records is none
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        load_json_splits(tmp_path / "train.json", 1.5)


# --- tokenizing --------------------------------------------------------------------------------


def test_tokenize_record_layout_and_mask(tokenizer):
    style = PromptStyle.from_name("alpaca")
    record = {"instruction": "Name a color.", "input": "The sky.", "output": "Blue."}
    prompt_ids = tokenizer.encode(style.apply("Name a color.", input="The sky."))
    expected = np.concatenate([prompt_ids, tokenizer.encode("Blue.", bos=False), [tokenizer.eos_id]])
    example, truncated = tokenize_record(record, tokenizer, style)
    assert not truncated and prompt_ids[0] == tokenizer.bos_id
    assert example["input_ids"].dtype == example["labels"].dtype == np.int32
    np.testing.assert_array_equal(example["input_ids"], expected)
    np.testing.assert_array_equal(example["labels"], expected)
    masked, _ = tokenize_record(record, tokenizer, style, mask_prompt=True, ignore_index=-7)
    assert (masked["labels"][: len(prompt_ids)] == -7).all()
    np.testing.assert_array_equal(masked["labels"][len(prompt_ids) :], expected[len(prompt_ids) :])


def test_truncation_warns_once_per_split(tokenizer, caplog):
    records = _records(5)
    full = tokenize_records(records, tokenizer, PromptStyle.from_name("alpaca"))
    limit = sorted(len(e["input_ids"]) for e in full)[2]  # the 2 longest exceed it (ties aside)
    n_long = sum(len(e["input_ids"]) > limit for e in full)
    with caplog.at_level(logging.WARNING):
        cut = tokenize_records(
            records, tokenizer, PromptStyle.from_name("alpaca"), max_seq_length=limit, split_name="val"
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{n_long} of 5 val examples" in warnings[0].getMessage()
    assert max(len(e["input_ids"]) for e in cut) == limit == effective_seq_length(cut, 10_000)
    assert effective_seq_length(full, limit) == limit
    assert effective_seq_length(full) == max(len(e["input_ids"]) for e in full)


def test_load_sft_splits_from_config(tmp_path, tokenizer):
    _write(tmp_path / "data.json", _records(12))
    cfg = ConfigDict({"name": "json", "json_path": str(tmp_path / "data.json"), "val_split_fraction": 0.25,
                      "mask_prompt": True, "prompt_style": None, "ignore_index": -100, "seed": 3,
                      "download_dir": str(tmp_path / "cache"), "url": None})
    train, val = load_sft_splits(cfg, tokenizer, max_seq_length=416, model_name="Llama-2-7b-chat-hf")
    assert (len(train), len(val)) == (9, 3)
    text = tokenizer.decode(train[0]["input_ids"])
    assert text.startswith("[INST] <<SYS>>") and max(len(e["input_ids"]) for e in train + val) <= 416
    assert (train[0]["labels"][:5] == -100).all()
    cfg.prompt_style = "alpaca"
    train_alpaca, _ = load_sft_splits(cfg, tokenizer, max_seq_length=None)
    assert tokenizer.decode(train_alpaca[0]["input_ids"]).startswith("Below is an instruction")
    cfg.name = "squad"
    with pytest.raises(ConfigError, match="Unknown dataset 'squad'; the known datasets are: json, alpaca"):
        load_sft_splits(cfg, tokenizer, 64)


def test_targets_cut_by_truncation_are_counted_and_none_left_is_refused(tokenizer, caplog):
    """mask_prompt + a max_seq_length inside the prompts: the run would train on loss 0 without a word."""
    style = PromptStyle.from_name("alpaca")
    records = _records(4)
    full = tokenize_records(records, tokenizer, style, mask_prompt=True)
    prompt_lens = sorted(int(np.argmax(e["labels"] != -100)) for e in full)
    ends = sorted(len(e["input_ids"]) for e in full)
    limit = prompt_lens[1] + 1  # at most 2 examples keep a target position, the others lose every target
    with caplog.at_level(logging.WARNING):
        cut = tokenize_records(records, tokenizer, style, mask_prompt=True, max_seq_length=limit)
    kept = sum(bool((e["labels"][1:] != -100).any()) for e in cut)
    assert 0 < kept < 4 and limit < ends[0]
    assert f"4 of 4 train examples are longer than max_seq_length={limit} and were truncated: {4 - kept} of " \
           f"them lost all their target tokens (no loss from them), {kept} part of them." in caplog.text
    with pytest.raises(DataError, match=r"no validation example keeps a token to compute the loss on: with "
                                        r"mask_prompt=True every response starts after max_seq_length=\d+"):
        tokenize_records(records, tokenizer, style, mask_prompt=True, max_seq_length=prompt_lens[0] - 1,
                         split_name="validation")


# --- named datasets and downloads ----------------------------------------------------------------


class _Server:
    """Serves ``routes[path] = (status, body, mode)`` on 127.0.0.1; mode "cut" sends half the body."""

    def __init__(self):
        self.routes, self.hits, self.headers = {}, Counter(), {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                server.headers[self.path] = dict(self.headers)
                status, body, mode = server.routes.get(self.path, (404, b"", "ok"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, path, body, status=200, mode="ok"):
        self.routes[path] = (status, body if isinstance(body, bytes) else body.encode(), mode)


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_download_caches_and_reuses(server, tmp_path):
    server.add("/alpaca.json", json.dumps(_records(30)))
    for _ in range(2):
        train, val = load_named_splits("alpaca", download_dir=tmp_path, url=f"{server.url}/alpaca.json", seed=0)
    assert server.hits["/alpaca.json"] == 1
    assert (len(train), len(val)) == (29, 1)  # Alpaca's own val_split_fraction, 0.03865
    assert [p.suffix for p in (tmp_path / "alpaca").iterdir()] == [".json"]


def test_default_cache_file_needs_no_network(tmp_path):
    (tmp_path / "alpacagpt4").mkdir()
    _write(tmp_path / "alpacagpt4" / "alpaca_gpt4_data.json", _records(10))
    train, val = load_named_splits("alpacagpt4", download_dir=tmp_path, val_split_fraction=0.2)
    assert (len(train), len(val)) == (8, 2)


def test_dolly_and_longform_mapping(server, tmp_path):
    dolly = [{"instruction": f"q{i}", "context": f"c{i}", "response": f"r{i}", "category": "qa"} for i in range(10)]
    server.add("/dolly.jsonl", "".join(json.dumps(r) + "\n" for r in dolly))
    train, val = load_named_splits("dolly", download_dir=tmp_path, url=f"{server.url}/dolly.jsonl", seed=0)
    assert (len(train), len(val)) == (9, 1)
    triples = {(r["instruction"], r["input"], r["output"]) for r in train + val}
    assert triples == {(f"q{i}", f"c{i}", f"r{i}") for i in range(10)}
    server.add("/lf/train.json", json.dumps([{"input": "write", "output": "text", "source": "x"}] * 3))
    server.add("/lf/val.json", json.dumps([{"input": "w2", "output": "t2", "source": "y"}]))
    train, val = load_named_splits("longform", download_dir=tmp_path, url=f"{server.url}/lf/")
    assert len(train) == 3 and val == [{"instruction": "w2", "input": "", "output": "t2"}]


def test_lima_needs_a_token(server, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="set HF_TOKEN"):
        load_named_splits("lima", download_dir=tmp_path)
    lima = [{"conversations": [f"ask {i}", f"answer {i}", "more"], "source": "s"} for i in range(10)]
    server.add("/lima.jsonl", "".join(json.dumps(r) + "\n" for r in lima))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    train, val = load_named_splits("lima", download_dir=tmp_path, url=f"{server.url}/lima.jsonl")
    assert server.headers["/lima.jsonl"]["Authorization"] == "Bearer hf_test"
    assert {"instruction": "ask 0", "input": "", "output": "answer 0"} in train + val


@pytest.mark.parametrize(
    "status, mode, message", [(200, "cut", "closed after 500 of 1000 bytes"), (500, "ok", "HTTP 500")]
)
def test_broken_download_leaves_nothing(server, tmp_path, status, mode, message):
    server.add(f"/broken{status}.json", b"x" * 1000, status=status, mode=mode)
    with pytest.raises(DataError, match=message) as error:
        load_named_splits("alpaca", download_dir=tmp_path, url=f"{server.url}/broken{status}.json")
    _assert_one_sentence(error)
    assert list((tmp_path / "alpaca").iterdir()) == []


def test_checksum_is_verified(server, tmp_path):
    body = json.dumps(_records(4)).encode()
    server.add("/sum.json", body)
    with pytest.raises(DataError, match="has sha256 .*, expected 00"):
        download_if_missing(f"{server.url}/sum.json", tmp_path / "sum.json", sha256="00" * 32)
    assert list(tmp_path.iterdir()) == []
    path = download_if_missing(f"{server.url}/sum.json", tmp_path / "sum.json", sha256=hashlib.sha256(body).hexdigest())
    assert read_records(path) == _records(4)


def test_alpaca2k_parquet(server, tmp_path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        pyarrow = None
    if pyarrow is None:
        server.add("/a2k.parquet", b"PAR1 not read")
        with pytest.raises(DataError, match="needs the optional package pyarrow") as error:
            load_named_splits("alpaca2k", download_dir=tmp_path, url=f"{server.url}/a2k.parquet")
        _assert_one_sentence(error)
        return
    local = tmp_path / "a.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(_records(20)), local)
    server.add("/a2k.parquet", local.read_bytes())
    train, val = load_named_splits("alpaca2k", download_dir=tmp_path, url=f"{server.url}/a2k.parquet")
    assert (len(train), len(val)) == (19, 1)


# --- batching ----------------------------------------------------------------------------------


def _dataset(lengths):
    return [
        {"input_ids": np.arange(1, n + 1, dtype=np.int32) + 100 * i, "labels": np.arange(1, n + 1, dtype=np.int32) - 50}
        for i, n in enumerate(lengths)
    ]


LENGTHS = [3, 9, 5, 12, 7, 2, 16, 4, 6, 11]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_content_and_padding():
    data = _dataset(LENGTHS)
    (batch,) = _take(BatchIterator(data, 4, seed=0, seq_len=10, pad_id=None, shuffle=False), 1)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 10)
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int32
    for row, example in enumerate(data[:4]):
        n = min(len(example["input_ids"]), 10)
        np.testing.assert_array_equal(batch["input_ids"][row, :n], example["input_ids"][:n])
        np.testing.assert_array_equal(batch["labels"][row, :n], example["labels"][:n])
        assert (batch["input_ids"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()


def test_resume_from_position_gives_the_same_batches():
    data = _dataset(LENGTHS)
    reference = BatchIterator(data, 4, seed=7, seq_len=16, pad_id=0)
    assert reference.steps_per_epoch == 2
    _take(reference, 5)  # crosses two epoch boundaries
    position = reference.position()
    assert position == {"epoch": 2, "index": 1, "seed": 7}
    expected = _take(reference, 4)
    resumed = BatchIterator(data, 4, seq_len=16, pad_id=0, **position)
    for a, b in zip(expected, _take(resumed, 4)):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_each_epoch_reshuffles():
    data = _dataset([1] * 12)  # row r of example i holds 1 + 100 * i
    batches = BatchIterator(data, 4, seed=1, seq_len=1, pad_id=0)
    epochs = [np.concatenate([b["input_ids"][:, 0] for b in _take(batches, 3)]) for _ in range(3)]
    assert all(sorted(e.tolist()) == [1 + 100 * i for i in range(12)] for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_processes_get_contiguous_slices_of_the_global_batch():
    data = _dataset(LENGTHS)
    single = _take(BatchIterator(data, 4, seed=3, seq_len=16, pad_id=0, length_bucket=4), 3)
    parts = [
        BatchIterator(data, 4, seed=3, seq_len=16, pad_id=0, process_index=p, process_count=2, length_bucket=4)
        for p in range(2)
    ]
    for whole in single:
        first, second = next(parts[0]), next(parts[1])
        assert first["input_ids"].shape == (2, whole["input_ids"].shape[1])
        np.testing.assert_array_equal(np.concatenate([first["input_ids"], second["input_ids"]]), whole["input_ids"])


def test_length_buckets_cut_padding():
    data = _dataset(LENGTHS)
    fixed = BatchIterator(data, 2, seed=0, seq_len=16, pad_id=0)
    bucketed = BatchIterator(data, 2, seed=0, seq_len=16, pad_id=0, length_bucket=4)
    for a, b in zip(_take(fixed, 5), _take(bucketed, 5)):
        width = b["input_ids"].shape[1]
        longest = int((a["labels"] != -100).sum(axis=1).max())
        assert a["input_ids"].shape[1] == 16 and width % 4 == 0 and longest <= width < longest + 4
        np.testing.assert_array_equal(a["input_ids"][:, :width], b["input_ids"])
    total = 5 * 2 * 16
    assert fixed.padding_fraction == pytest.approx((total - sum(LENGTHS)) / total)
    assert 0 < bucketed.padding_fraction < fixed.padding_fraction
    assert bucketed.epoch_padding_fraction(0) == pytest.approx(bucketed.padding_fraction)


def test_drop_last_false_fills_with_padding_rows():
    batches = BatchIterator(_dataset(LENGTHS), 4, seed=0, seq_len=16, pad_id=9, shuffle=False, drop_last=False)
    last = _take(batches, 3)[-1]
    assert batches.position() == {"epoch": 1, "index": 0, "seed": 0}
    assert (last["labels"][2:] == -100).all() and (last["input_ids"][2:] == 9).all()
    assert (last["labels"][:2] != -100).any(axis=1).all()


def test_batch_settings_are_checked():
    data = _dataset(LENGTHS)
    assert (steps_per_epoch(10, 4), steps_per_epoch(10, 4, drop_last=False)) == (2, 3)
    with pytest.raises(ConfigError, match="positive multiple of the process count 4"):
        BatchIterator(data, 6, seed=0, seq_len=8, pad_id=0, process_count=4)
    with pytest.raises(DataError, match="fewer than one global batch of 16"):
        BatchIterator(data, 16, seed=0, seq_len=8, pad_id=0)
    with pytest.raises(ConfigError, match="index 2 is outside an epoch of 2 batches"):
        BatchIterator(data, 4, seed=0, seq_len=8, pad_id=0, index=2)
    with pytest.raises(DataError, match="empty"):
        BatchIterator([], 4, seed=0, seq_len=8, pad_id=0)


def test_eval_batches_in_order():
    data = _dataset(LENGTHS)
    batches = list(eval_batches(data, 4, seq_len=16, pad_id=0))
    assert len(batches) == 3
    firsts = np.concatenate([b["input_ids"][:, 0] for b in batches])
    np.testing.assert_array_equal(firsts[:10], [1 + 100 * i for i in range(10)])
    assert (batches[-1]["labels"][2:] == -100).all()
    assert len(list(eval_batches(data, 4, seq_len=16, pad_id=0, max_iters=2))) == 2
