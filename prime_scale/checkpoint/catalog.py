"""The completeness manifest of a checkpoint, and finding the newest complete checkpoint.

A checkpoint directory holds one folder per save, `step_<N>`, plus a `latest` pointer:

    <ckpt_dir>/step_200/manifest.json      <- written last, inside the unpublished folder
    <ckpt_dir>/step_200/...                <- DeepSpeed's per-rank files, our per-rank extra state
    <ckpt_dir>/latest                      <- "step_200" (DeepSpeed's own format, so its load works too)

A folder counts as a checkpoint only if its manifest parses and every file it lists exists with the
recorded size. Saves happen in `step_<N>.tmp-<nonce>` and are renamed into place after the manifest
is written, so a crash at any moment leaves either the old set of checkpoints or the new one.
Pure Python (no torch): `prime-scale convert` and tools can use it cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from prime_scale import fsio
from prime_scale.errors import UserError

FORMAT = "prime-scale-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d+)$")
TMP_MARK = ".tmp-"
TRASH_MARK = ".trash-"


class IncompleteCheckpoint(UserError):
    """A folder that is not a complete checkpoint (no manifest, or files missing or truncated)."""


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete checkpoint folder; IncompleteCheckpoint (naming what is wrong) otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise IncompleteCheckpoint(f"{folder}: not a directory")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{folder}: no {MANIFEST}; the save that wrote this folder did not finish, "
                                   "so it is not a checkpoint") from None
    except (OSError, ValueError) as e:
        raise IncompleteCheckpoint(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IncompleteCheckpoint(f"{path}: not a prime-scale checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise IncompleteCheckpoint(f"{path}: manifest version {manifest.get('version')} is not supported "
                                   f"(this prime-scale reads version {VERSION})")
    for entry in manifest.get("files", []):
        f = folder / entry["path"]
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise IncompleteCheckpoint(f"{folder}: file {entry['path']} listed in the manifest is missing") from None
        if size != entry["bytes"]:
            raise IncompleteCheckpoint(f"{folder}: file {entry['path']} has {size} bytes, the manifest says "
                                       f"{entry['bytes']} (truncated or overwritten)")
    return manifest


def is_complete(folder: Path) -> bool:
    try:
        read_manifest(folder)
        return True
    except IncompleteCheckpoint:
        return False


def list_step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Published `step_<N>` folders (complete or not), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        m = STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def list_complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    return [(step, p) for step, p in list_step_dirs(ckpt_dir) if is_complete(p)]


def find_latest_complete(ckpt_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None. The `latest` pointer is not trusted:
    a crash between publishing a folder and updating the pointer must not hide the newer checkpoint."""
    for _, folder in reversed(list_step_dirs(ckpt_dir)):
        if is_complete(folder):
            return folder
    return None


def resolve_checkpoint(ref: Path) -> Path:
    """A user's CKPT argument: a checkpoint folder, a checkpoint directory (its newest complete
    checkpoint) or a run directory (its checkpoints/ subfolder). UserError naming what was found."""
    ref = Path(ref)
    if not ref.exists():
        raise UserError(f"{ref}: no such checkpoint or directory")
    if (ref / MANIFEST).exists() or STEP_RE.match(ref.name) or TMP_MARK in ref.name:
        read_manifest(ref)  # raises with the reason when incomplete
        return ref
    for candidate in (ref, ref / "checkpoints"):
        latest = find_latest_complete(candidate)
        if latest is not None:
            return latest
    incomplete = [p.name for _, p in list_step_dirs(ref)] + [p.name for _, p in list_step_dirs(ref / "checkpoints")]
    hint = f" (incomplete folders only: {', '.join(incomplete)})" if incomplete else ""
    raise UserError(f"{ref}: no complete checkpoint found{hint}; give a step_<N> folder, a checkpoint "
                    "directory or a run directory")


# --------------------------------------------------------------------------- publishing and retention (rank 0)


def list_files(folder: Path) -> list[dict]:
    """Every regular file under folder with its size, fsynced so the manifest never outlives its data."""
    files = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            p = Path(root) / name
            fsio.fsync_file(p)
            files.append({"path": str(p.relative_to(folder)), "bytes": p.stat().st_size})
    return sorted(files, key=lambda e: e["path"])


def remove_tree(folder: Path) -> None:
    """Delete a checkpoint so that no half-deleted folder can look complete: rename it out of the
    step_<N> namespace first, then delete."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder.with_name(folder.name + TRASH_MARK + str(os.getpid()))
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(ckpt_dir: Path, keep: str = "") -> list[str]:
    """Delete leftovers of interrupted saves and deletions (`*.tmp-*`, `*.trash-*`), except `keep`."""
    removed = []
    for child in Path(ckpt_dir).iterdir():
        if child.name == keep or not child.is_dir():
            continue
        if TMP_MARK in child.name or TRASH_MARK in child.name:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def apply_retention(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Keep the newest `keep_last` complete checkpoints; delete the older complete ones. Folders that
    are not complete checkpoints are left alone (they are not ours to judge)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    complete = list_complete(ckpt_dir)
    removed = []
    for _, folder in complete[:-keep_last]:
        remove_tree(folder)
        removed.append(folder.name)
    return removed
