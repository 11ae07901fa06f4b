"""`prime-scale checkpoint verify RUN_OR_DIR`: is every checkpoint intact? Each `step_<N>` folder's
files are checked against its manifest (sizes, then content hashes), one line per checkpoint;
exit 0 when all are intact, 2 when any is damaged or incomplete. Pure file reading: no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from prime_scale.errors import OK, USER_ERROR, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check every checkpoint's files against its manifest's sizes and hashes")
    verify.add_argument("path", help="a run directory, a checkpoint directory or one step_<N> folder")


def _folders(path: Path) -> list[Path]:
    from prime_scale.checkpoint import catalog

    if (path / catalog.MANIFEST).exists() or catalog.STEP_RE.match(path.name):
        return [path]
    for directory in (path, path / "checkpoints"):
        found = [p for _, p in catalog.list_step_dirs(directory)]
        if found:
            return found
    raise UserError(f"{path}: no step_<N> checkpoint folders here or in {path / 'checkpoints'}")


def main(args: argparse.Namespace) -> int:
    from prime_scale.checkpoint import catalog

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or directory")
    bad = 0
    for folder in _folders(path):
        problems = catalog.damage(folder)
        if problems:
            bad += 1
            print(f"DAMAGED  {folder}")
            for line in problems:
                print(f"         {line}")
            continue
        hashed = catalog.has_hashes(catalog.read_manifest(folder))
        print(f"ok       {folder}{'' if hashed else '  (sizes only: written before checkpoints recorded hashes)'}")
    if bad:
        print(f"{bad} damaged or incomplete checkpoint(s): resume skips them (--resume auto falls back to the "
              "newest intact one); restore them from a copy if you need them")
        return USER_ERROR
    return OK
