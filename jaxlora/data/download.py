"""Download a file once into a cache directory, atomically, with an optional sha256 check.

The bytes go to a hidden temporary file next to the destination and are renamed into place
only when the transfer is complete (all of ``Content-Length`` received) and the checksum, when
known, matches. Any failure removes the temporary file and raises ``DataError``: a cache never
holds a partial file. A file already in the cache is reused without touching the network.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from jaxlora.errors import DataError

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


def sha256_of(path: str | Path) -> str:
    """Hex sha256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_if_missing(
    url: str,
    path: str | Path,
    *,
    sha256: str | None = None,
    token: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """``path``, downloading ``url`` to it first unless a non-empty file is already there.

    Args:
        sha256: expected hex digest of the download; None skips the check.
        token: sent as ``Authorization: Bearer <token>`` (gated Hugging Face datasets).
        timeout_s: socket timeout for connecting and for each read.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    headers = {"User-Agent": "jaxlora"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    logger.info("Downloading %s to %s", url, path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            received, expected = _fetch(url, headers, timeout_s, tmp_file)
        if expected is not None and received != expected:
            raise DataError(f"Downloading {url} failed: the connection closed after {received} of {expected} bytes.")
        if sha256 is not None and (actual := sha256_of(tmp_name)) != sha256.lower():
            raise DataError(f"The download of {url} has sha256 {actual}, expected {sha256}.")
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return path


def _fetch(url: str, headers: dict[str, str], timeout_s: float, out) -> tuple[int, int | None]:
    """Streams ``url`` into ``out``; (bytes received, Content-Length or None)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as error:
        hint = " (a gated dataset: set HF_TOKEN to a Hugging Face access token)" if error.code in (401, 403) else ""
        raise DataError(f"Downloading {url} failed with HTTP {error.code} {error.reason}{hint}.") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(f"Downloading {url} failed: {reason}.") from None
    return received, int(length) if length is not None else None
