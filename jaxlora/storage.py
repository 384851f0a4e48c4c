"""Run paths that may be local or a URL (`gs://bucket/run`, or another fsspec URL etils.epath handles).

A TPU pod's hosts have no shared local disk, so a pod run's `out_dir` is usually a GCS URL. Local
paths stay `pathlib.Path`s (absolute) and behave as before; a URL becomes an `etils.epath.Path`,
which Orbax takes as it is (arrays go through tensorstore's own GCS driver, the rest through fsspec:
`gcsfs` for gs://, the `gcs` extra: `pip install "jaxlora[gcs]"`).

A base checkpoint_dir given as a URL is mirrored into a local cache (`local_checkpoint`): the model
is read many times per run and tensor by tensor, which object storage serves badly.

Files other than Orbax's are written whole and replaced at once: locally into a temporary file in
the same directory then `os.replace`d over the target; on object storage by one upload, which
replaces the object atomically (a reader sees the old object or the new one, never a part).

Credentials for real GCS are gcsfs's and tensorstore's defaults: Application Default Credentials
(on a TPU/GCE VM, the VM's service account from the metadata server). Against an emulator set
STORAGE_EMULATOR_HOST (gcsfs), TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Union

from jaxlora.errors import CheckpointError, ConfigError

AnyPath = Union[Path, "epath.Path"]  # noqa: F821 - etils is imported lazily

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# The fsspec package each URL scheme needs (others: the scheme's fsspec implementation, if any).
_PACKAGES = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", None), "az": ("adlfs", None)}


def is_url(path) -> bool:
    """True for `scheme://...` (gs://, s3://, ...); False for local paths (also `file://`-less ones)."""
    return bool(_URL.match(os.fspath(path))) if isinstance(path, (str, os.PathLike)) else False


def scheme(path) -> str | None:
    m = _URL.match(os.fspath(path))
    return m[1].lower() if m else None


def as_path(path) -> AnyPath:
    """A local path -> absolute `pathlib.Path`; a URL -> `etils.epath.Path` (ConfigError, in one sentence,
    when the package its scheme needs is not installed)."""
    if not is_url(path):
        return Path(path).absolute()
    check_available(path)
    from etils import epath
    return epath.Path(os.fspath(path).rstrip("/"))


def path(p) -> AnyPath:
    """As `as_path`, but a local path is kept as given (relative stays relative)."""
    return as_path(p) if is_url(p) else Path(p)


def check_available(path) -> None:
    """ConfigError unless the fsspec implementation for `path`'s URL scheme can be imported."""
    s = scheme(path)
    package, extra = _PACKAGES.get(s, (None, None))
    if package is None:
        return
    try:
        __import__(package)
    except ImportError:
        how = f'pip install "jaxlora[{extra}]"' if extra else f"pip install {package}"
        raise ConfigError(f"{os.fspath(path)} is a {s}:// URL, which needs the {package} package: {how}") from None


def bucket(url) -> AnyPath:
    """The root of a URL's bucket (gs://bucket for gs://bucket/run/...)."""
    head, rest = os.fspath(url).split("://", 1)
    return as_path(f"{head}://{rest.split('/', 1)[0]}")


def same_location(a, b) -> bool:
    return str(as_path(a)) == str(as_path(b))


def write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` whole: a reader sees the old file or the new one (see the module docstring)."""
    path = as_path(path)
    if is_url(path):
        path.parent.mkdir(parents=True, exist_ok=True)  # a no-op on object storage; real on other fsspec stores
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def upload(local: str | os.PathLike, path) -> None:
    """Copy the local file `local` to `path` whole (as `write_bytes`)."""
    write_bytes(path, Path(local).read_bytes())


def upload_dir(local_dir: str | os.PathLike, path) -> None:
    """Copy every file under `local_dir` to the same relative place under `path`, each whole."""
    local_dir = Path(local_dir)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            upload(f, as_path(path) / f.relative_to(local_dir).as_posix())


def download(path, local: str | os.PathLike) -> Path:
    """Copy the file `path` (local or URL) to the local file `local`; returns `local`."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    src = as_path(path)
    if is_url(src):
        local.write_bytes(src.read_bytes())
    else:
        shutil.copyfile(src, local)
    return local


def local_dir(prefix: str = "jaxlora-") -> Path:
    """A new local staging directory (removed by the caller, or at exit by the OS's tmp cleaning)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# The files of an HF checkpoint that jaxlora reads (config, tokenizer, weights); others (*.bin, *.pth,
# READMEs, original/ folders) are not mirrored.
_CHECKPOINT_FILE = re.compile(r"^(config\.json|generation_config\.json|special_tokens_map\.json|tokenizer[^/]*|"
                              r"chat_template\.(json|jinja)|[^/]*\.safetensors|[^/]*\.safetensors\.index\.json)$")


def cache_root() -> Path:
    """Where URL checkpoints are mirrored: $JAXLORA_CACHE, else ~/.cache/jaxlora."""
    return Path(os.environ.get("JAXLORA_CACHE") or Path.home() / ".cache" / "jaxlora")


def local_checkpoint(checkpoint_dir, *, weights: bool = True) -> Path:
    """`checkpoint_dir` as a local directory: a local path as given; a URL (gs://bucket/model) mirrored under
    `cache_root()/remote/<scheme>/<bucket>/<path>` (config, tokenizer and, with `weights`, the safetensors
    files). A file already there with the remote size is kept, so a second run (or the second call, with
    weights, after a first without) downloads nothing; each file is downloaded whole into a temporary
    file and renamed, so an interrupted download leaves no file that looks complete."""
    if not is_url(checkpoint_dir):
        return Path(checkpoint_dir)
    remote = as_path(checkpoint_dir)
    head, rest = os.fspath(remote).split("://", 1)
    local = cache_root() / "remote" / head / rest
    try:
        files = [p for p in remote.iterdir() if _CHECKPOINT_FILE.match(p.name)] if remote.is_dir() else []
        if not any(p.name == "config.json" for p in files):
            raise CheckpointError(f"checkpoint_dir {checkpoint_dir} holds no config.json; point it at the directory "
                                  "(prefix) with the model's config.json, *.safetensors and tokenizer")
        local.mkdir(parents=True, exist_ok=True)
        for file in files:
            target = local / file.name
            if (not weights and file.name.endswith(".safetensors")) or (
                    target.is_file() and target.stat().st_size == file.stat().length):
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=local)
            try:
                with os.fdopen(fd, "wb") as out, file.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (CheckpointError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - credentials, network, a full local disk: whatever is raised
        raise CheckpointError(f"checkpoint_dir {checkpoint_dir} cannot be mirrored into {local}: "
                              f"{type(e).__name__}: {str(e).strip()[:200]}") from None
    return local
