"""Open a prepared dataset by path or URI: its validated manifest and the local directory it lives in.

A local path is used in place. A remote URI (s3://, gs://, hf://, file://, … anything
mosaicml-streaming can download; data/remote.py) is mirrored into a local cache: the manifest is
fetched anew each time (a re-prepared dataset invalidates the cache), the tokenizer files and the
MDS index files when the dataset is opened, the shards when a reader first needs them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prime_scale.data.format import MANIFEST_NAME, SP_MODEL, TOKENIZER_META, read_manifest_file
from prime_scale.data.remote import download, private_tmp, remote_join, cache_dir_for, fetch, is_remote


def open_dataset(dataset: str | os.PathLike) -> dict:
    """The validated manifest of a prepared dataset (a local directory or a remote URI), with
    `dataset_dir` (the local directory, a cache for remote datasets) and `uri` (as given) added."""
    local = localize_dataset(str(dataset))
    m = read_manifest_file(local / MANIFEST_NAME)
    m["dataset_dir"] = str(local)
    m["uri"] = str(dataset)
    return m


def localize_dataset(path: str) -> Path:
    """The local directory of a dataset: the path itself, or the cache of a remote URI.

    For a URI, the manifest is fetched anew each time (a re-prepared remote dataset invalidates
    the cache), then the tokenizer files and per-split index files."""
    if not is_remote(path):
        return Path(path)
    local = cache_dir_for(path)
    local.mkdir(parents=True, exist_ok=True)
    cached = local / MANIFEST_NAME
    fresh = private_tmp(cached)
    try:
        download(remote_join(path, MANIFEST_NAME), fresh)
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
        fetch(path, f"{tok['dir']}/{TOKENIZER_META}", local)
        if tok["kind"] == "sentencepiece":
            fetch(path, f"{tok['dir']}/{SP_MODEL}", local)
    if m["format"] == "mds":
        for split in m["splits"]:
            fetch(path, f"{split}/index.json", local)
    return local
