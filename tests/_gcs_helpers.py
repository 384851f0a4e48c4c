"""A local GCS emulator (gcp-storage-emulator, in memory, on 127.0.0.1) and a tiny finetune config for it.

`emulator()` starts the emulator in a child process with one bucket and returns the environment that
points every layer at it: gcsfs (fsspec's gs://, which etils.epath and so Orbax's paths use) honours
STORAGE_EMULATOR_HOST; tensorstore's GCS driver (Orbax's arrays) takes its endpoint from
TENSORSTORE_GCS_HTTP_URL and, with GOOGLE_AUTH_TOKEN_FOR_TESTING set, sends that token instead of
looking for credentials. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: recent gcsfs otherwise asks the
Storage Control gRPC API for the bucket's layout, which the emulator does not serve (a 60 s timeout).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

BUCKET = "jaxlora-test"


# Two adjustments of gcp-storage-emulator (2026.7) for tensorstore:
# - its HTTP server serves one request at a time with Python's default listen backlog of 5: tensorstore's
#   many parallel requests overflow it, and each dropped connection waits for TCP's SYN retransmission
#   (1 s, 3 s, ...): a backlog of 1024 keeps them queued (still served one at a time);
# - a media download has no x-goog-generation / x-goog-metageneration headers, from which tensorstore
#   takes an object's generation (OCDBT rewrites its manifest conditionally on it): without them a
#   save fails at random with "Malformed StorageGeneration". The emulator does not check
#   ifGenerationMatch preconditions at all, so tensorstore's concurrent-writer protection is not exercised.
_LAUNCH = """
import logging, sys
from http import server
import gcp_storage_emulator.server as emulator
from gcp_storage_emulator.handlers import objects
class Server(server.HTTPServer):
    request_queue_size = 1024
emulator.server.HTTPServer = Server
plain_download = objects.download
def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:
        pass
    return plain_download(request, response, storage, *args, **kwargs)
objects.download = download
for _, methods in emulator.HANDLERS:
    for method, handler in list(methods.items()):
        if handler is plain_download:
            methods[method] = download
logging.basicConfig(level=logging.CRITICAL)
emulator.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator(log_file: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """(the emulator process, the environment variables that point gcsfs and tensorstore at it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(port), BUCKET], stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise RuntimeError(f"the GCS emulator did not start:\n{log_file.read_text()}") from None
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    return proc, env


def gcs_fs():
    """A gcsfs filesystem on the emulator (anonymous: the emulator checks no credentials)."""
    import gcsfs
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    return fs


def tiny_finetune_config(tmp_path: Path, out_dir: str, *, max_steps: int):
    """A finetune config on a tiny Llama-shaped checkpoint dir and a 12-record JSON dataset (as test_loop's
    end-to-end test); load_model must be faked with `_train_helpers.fake_load_model`."""
    from _data_helpers import LLAMA2_TOKENIZER_CONFIG, make_sentencepiece_dir, write_json

    from jaxlora.config import base_config

    ckpt = tmp_path / "ckpt"
    if not ckpt.is_dir():
        make_sentencepiece_dir(ckpt, LLAMA2_TOKENIZER_CONFIG)
        write_json(ckpt / "config.json", {
            "model_type": "llama", "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5})
        records = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"} for w in
                   "red green blue cat dog fish sun moon one two three four".split()]
        write_json(tmp_path / "data.json", records)
    cfg = base_config()
    cfg.checkpoint_dir, cfg.out_dir, cfg.precision = str(ckpt), out_dir, "32-true"
    cfg.data.name, cfg.data.json_path, cfg.data.val_split_fraction = "json", str(tmp_path / "data.json"), 0.25
    cfg.data.prompt_style = "default"
    cfg.train.update(global_batch_size=4, micro_batch_size=2, epochs=None, max_steps=max_steps, save_interval=2,
                     lr_warmup_steps=1, max_seq_length=64)
    cfg.eval.update(interval=2, max_iters=1, max_new_tokens=None)
    cfg.checkpoint.max_to_keep = None
    return cfg


def load_safetensors_bytes(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load
    return load(data)


def env_for_subprocess(env: dict[str, str]) -> dict[str, str]:
    return dict(os.environ, **env, JAX_PLATFORMS="cpu")
