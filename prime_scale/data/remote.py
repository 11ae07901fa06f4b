"""Files behind a URI, fetched into a local cache with mosaicml-streaming's downloaders.

Any scheme mosaicml-streaming can download (s3://, gs://, oci://, hf://, azure://, dbfs:/, sftp://…)
works, plus file:// (a mounted file system whose files should be copied to local disk first).
The manifest, the tokenizer files and the MDS index files are fetched when the dataset is opened;
shards are fetched when a reader first needs them. Every file is downloaded to a private temp
name and renamed into place, so ranks and workers that fetch the same file at once are safe.

Cache location: $PRIME_SCALE_CACHE, else ~/.cache/prime-scale; one folder per URI.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

from prime_scale.errors import UserError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://…, gs://…, dbfs:/Volumes/…, file://…
DOWNLOAD_TIMEOUT_S = 600.0


class RemoteNotFound(UserError):
    """The remote file does not exist (as opposed to a download that failed)."""


def is_remote(path: str) -> bool:
    return bool(_URI.match(path))


def cache_root() -> Path:
    env = os.environ.get("PRIME_SCALE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prime-scale"


def cache_dir_for(uri: str) -> Path:
    digest = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    return cache_root() / "datasets" / f"{name}-{digest}"


def remote_join(uri: str, rel: str) -> str:
    return uri.rstrip("/") + "/" + rel


def download(remote: str, dst: Path) -> None:
    """Download one file to `dst` (a private temp name chosen by the caller)."""
    try:
        from prime_scale.data.streaming_compat import import_streaming

        import_streaming()
        from streaming.base.storage.download import CloudDownloader

        # file:// goes through streaming's local downloader (a bare path), like any cloud scheme
        source = remote[len("file://"):] if remote.startswith("file://") else remote
        CloudDownloader.direct_download(source, str(dst), timeout=DOWNLOAD_TIMEOUT_S)
    except FileNotFoundError:
        raise RemoteNotFound(f"{remote}: not found") from None
    except Exception as e:  # each cloud SDK raises its own types; name the file either way
        raise UserError(f"{remote}: download failed: {type(e).__name__}: {e}") from None


def private_tmp(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fetch(uri: str, rel: str, local_root: Path) -> Path:
    """Make `local_root/rel` a copy of `uri/rel` (downloaded once; atomic rename)."""
    dst = Path(local_root) / rel
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(dst)
    try:
        download(remote_join(uri, rel), tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
