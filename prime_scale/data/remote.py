"""Datasets behind a URI: fetched file by file into a local cache with mosaicml-streaming's downloaders.

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
import shutil
import uuid
from pathlib import Path

from prime_scale.errors import UserError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://…, gs://…, dbfs:/Volumes/…, file://…
DOWNLOAD_TIMEOUT_S = 600.0


def is_remote(path: str) -> bool:
    return bool(_URI.match(path))


def cache_root() -> Path:
    env = os.environ.get("PRIME_SCALE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prime-scale"


def cache_dir_for(uri: str) -> Path:
    digest = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    return cache_root() / "datasets" / f"{name}-{digest}"


def _remote_join(uri: str, rel: str) -> str:
    return uri.rstrip("/") + "/" + rel


def _download(remote: str, dst: Path) -> None:
    """Download one file to `dst` (a private temp name chosen by the caller)."""
    try:
        from prime_scale.data.streaming_compat import import_streaming

        import_streaming()
        from streaming.base.storage.download import CloudDownloader

        # file:// goes through streaming's local downloader (a bare path), like any cloud scheme
        source = remote[len("file://"):] if remote.startswith("file://") else remote
        CloudDownloader.direct_download(source, str(dst), timeout=DOWNLOAD_TIMEOUT_S)
    except FileNotFoundError:
        raise UserError(f"{remote}: not found") from None
    except Exception as e:  # each cloud SDK raises its own types; name the file either way
        raise UserError(f"{remote}: download failed: {type(e).__name__}: {e}") from None


def _private_tmp(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fetch(uri: str, rel: str, local_root: Path) -> Path:
    """Make `local_root/rel` a copy of `uri/rel` (downloaded once; atomic rename)."""
    dst = Path(local_root) / rel
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_tmp(dst)
    try:
        _download(_remote_join(uri, rel), tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def localize_dataset(path: str) -> Path:
    """The local directory of a dataset: the path itself, or the cache of a remote URI.

    For a URI, the manifest is fetched anew each time (a re-prepared remote dataset invalidates
    the cache), then the tokenizer files and per-split index files."""
    if not is_remote(path):
        return Path(path)
    from prime_scale.data.manifest import MANIFEST_NAME, read_manifest_file

    local = cache_dir_for(path)
    local.mkdir(parents=True, exist_ok=True)
    cached = local / MANIFEST_NAME
    fresh = _private_tmp(cached)
    try:
        _download(_remote_join(path, MANIFEST_NAME), fresh)
        if cached.exists() and cached.read_bytes() != fresh.read_bytes():
            for child in local.iterdir():  # stale files of an older preparation
                if not child.name.startswith("."):
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        os.replace(fresh, cached)
    finally:
        if fresh.exists():
            fresh.unlink()
    m = read_manifest_file(cached)
    tok = m["tokenizer"]
    if tok.get("dir"):
        from prime_scale.data.tokenizer import SP_MODEL, TOKENIZER_META

        fetch(path, f"{tok['dir']}/{TOKENIZER_META}", local)
        if tok["kind"] == "sentencepiece":
            fetch(path, f"{tok['dir']}/{SP_MODEL}", local)
    if m["format"] == "mds":
        for split in m["splits"]:
            fetch(path, f"{split}/index.json", local)
    return local
