"""The completeness manifest of a checkpoint, and finding the newest complete checkpoint.

A checkpoint directory holds one folder per save, `step_<N>`, plus a `latest` pointer:

    <ckpt_dir>/step_200/manifest.json      <- written last, inside the unpublished folder
    <ckpt_dir>/step_200/...                <- DeepSpeed's per-rank files, our per-rank extra state
    <ckpt_dir>/latest                      <- "step_200" (DeepSpeed's own format, so its load works too)

A folder counts as a checkpoint only if its manifest parses and every file it lists exists with the
recorded size (`read_manifest`, cheap). The manifest also records every file's SHA-256, computed
by the rank that wrote the file while it flushes it to disk (and that rank, `rank`); `verify`
re-reads the files and names any whose content changed (bit rot, an overwrite that kept the size). Resume, `convert`, `eval` and
`prime-scale checkpoint verify` check it. Saves happen in `step_<N>.tmp-<nonce>` and are renamed
into place after the manifest is written, so a crash at any moment leaves either the old set of
checkpoints or the new one. Pure Python (no torch): `prime-scale convert` and tools can use it cheaply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from prime_scale import fsio
from prime_scale.data.integrity import HASH, file_digest  # one file hash for datasets and checkpoints
from prime_scale.errors import UserError

FORMAT = "prime-scale-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d+)$")
TMP_MARK = ".tmp-"
TRASH_MARK = ".trash-"
DAMAGED_MARK = ".damaged-"


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


# --------------------------------------------------------------------------- content hashes


def describe_files(folder: Path, paths: Iterable[str]) -> list[dict]:
    """{path, bytes, sha256} of the given files of folder, each fsynced (so the manifest never outlives
    its data). The hash reads the file back from the page cache while another thread flushes it to
    disk: the flush, not the hash, bounds the time."""
    folder = Path(folder)
    paths = sorted(paths)
    with ThreadPoolExecutor(max_workers=2) as pool:
        # submitted in pairs, so one thread flushes a file while the other hashes it
        jobs = [(pool.submit(fsio.fsync_file, folder / p), pool.submit(file_digest, folder / p)) for p in paths]
        out = [{"path": p, "bytes": (folder / p).stat().st_size, HASH: digest.result()}
               for p, (_, digest) in zip(paths, jobs)]
        for flushed, _ in jobs:
            flushed.result()
    return out


def relative_files(folder: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every regular file under folder, as paths relative to it (top-level entries in `skip` left out)."""
    skip = set(skip)
    out = []
    for root, dirs, names in os.walk(folder):
        if Path(root) == Path(folder):
            dirs[:] = [d for d in dirs if d not in skip]
        out += [str((Path(root) / n).relative_to(folder)) for n in names if Path(root) != Path(folder) or n not in skip]
    return sorted(out)


def share_of(entries: list[dict], rank: int, world: int) -> list[dict]:
    """Rank `rank`'s part of a collective verification by `world` ranks: the files recorded as written
    by a rank r with r % world == rank (under the writing layout, the files it wrote itself, likely
    still in its node's page cache), and every world-th of the files without a writer."""
    mine = [e for e in entries if "rank" in e and int(e["rank"]) % world == rank]
    return mine + [e for e in entries if "rank" not in e][rank::world]


def damage(folder: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a checkpoint folder, one line per file ([] = intact). Sizes first (cheap, all
    files); then the recorded hashes are recomputed, of rank's share (share_of) for share=(rank, world)
    (a rank's part of a collective verification; default all of them)."""
    try:
        manifest = read_manifest(folder)
    except IncompleteCheckpoint as e:
        return [str(e)]
    rank, world = share
    problems = []
    for entry in share_of(manifest["files"], rank, world):
        expected = entry.get(HASH)
        if expected is None:
            continue  # written before prime-scale recorded hashes: the size check is all there is
        try:
            found = file_digest(Path(folder) / entry["path"])
        except OSError as e:
            problems.append(f"{folder}/{entry['path']}: unreadable ({e.strerror})")
            continue
        if found != expected:
            problems.append(f"{folder}/{entry['path']}: content changed since it was saved ({HASH} expected "
                            f"{expected[:16]}…, found {found[:16]}…)")
    return problems


def has_hashes(manifest: dict) -> bool:
    return all(HASH in e for e in manifest.get("files", []))


def damaged_checkpoint_error(folder: Path, problems: list[str]) -> UserError:
    return UserError(f"{folder} is damaged: " + "; ".join(problems[:3]) +
                     (f"; and {len(problems) - 3} more" if len(problems) > 3 else "") +
                     ". Restore it from a copy, or use an older step_<N> folder (`prime-scale checkpoint "
                     "verify` lists the intact ones)")


def resolve_checkpoint(ref: Path, verify: bool = True) -> Path:
    """A user's CKPT argument: a checkpoint folder, a checkpoint directory (its newest complete
    checkpoint) or a run directory (its checkpoints/ subfolder). UserError naming what was found;
    with `verify`, the folder's file contents are checked against the manifest's hashes too."""
    ref = Path(ref)
    if not ref.exists():
        raise UserError(f"{ref}: no such checkpoint or directory")
    if (ref / MANIFEST).exists() or STEP_RE.match(ref.name) or TMP_MARK in ref.name:
        read_manifest(ref)  # raises with the reason when incomplete
        return _verified(ref) if verify else ref
    for candidate in (ref, ref / "checkpoints"):
        latest = find_latest_complete(candidate)
        if latest is not None:
            return _verified(latest) if verify else latest
    incomplete = [p.name for _, p in list_step_dirs(ref)] + [p.name for _, p in list_step_dirs(ref / "checkpoints")]
    hint = f" (incomplete folders only: {', '.join(incomplete)})" if incomplete else ""
    raise UserError(f"{ref}: no complete checkpoint found{hint}; give a step_<N> folder, a checkpoint "
                    "directory or a run directory")


def _verified(folder: Path) -> Path:
    problems = damage(folder)
    if problems:
        raise damaged_checkpoint_error(folder, problems)
    return folder


# --------------------------------------------------------------------------- publishing and retention (rank 0)


def list_files(folder: Path) -> list[dict]:
    """Every regular file under folder with its size and hash, fsynced."""
    return describe_files(folder, relative_files(folder))


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


def set_aside(folder: Path) -> Path:
    """Move a damaged checkpoint out of the step_<N> namespace (never delete it: it may be all the
    user has), so that neither resume nor retention nor a new save of its step touches it again."""
    aside = folder.with_name(folder.name + DAMAGED_MARK + os.urandom(3).hex())
    os.replace(folder, aside)
    return aside


def apply_retention(ckpt_dir: Path, keep_last: int, protect: Iterable[str] = ()) -> list[str]:
    """Keep the newest `keep_last` complete checkpoints; delete the older complete ones, except the
    names in `protect` (checkpoints found damaged: kept for the user to inspect). Folders that are
    not complete checkpoints are left alone (they are not ours to judge)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    protect = set(protect)
    complete = [(step, p) for step, p in list_complete(ckpt_dir) if p.name not in protect]
    removed = []
    for _, folder in complete[:-keep_last]:
        remove_tree(folder)
        removed.append(folder.name)
    return removed
