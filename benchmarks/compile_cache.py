"""Carry torch.compile's on-disk caches (Inductor's and Triton's, under one folder) from one GPU
session to the next: `pack` writes the folder as one .tar.xz under a size limit (the device tool
returns files of at most 16 MiB), `unpack` restores it. benchmarks/gpu_check.sh calls both.

    python benchmarks/compile_cache.py pack CACHE_DIR OUT.tar.xz [--limit-mib 15]
    python benchmarks/compile_cache.py unpack ARCHIVE.tar.xz CACHE_DIR
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

DEFAULT_LIMIT_MIB = 15.0


def pack(cache_dir: Path, archive: Path, limit_bytes: int) -> int | None:
    """Write `cache_dir`'s files to `archive` (xz); its size in bytes, or None (and no archive) when
    that is over `limit_bytes`. Lock files are left out: they belong to the processes that made them."""
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"no compile cache at {cache_dir}")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        for path in sorted(cache_dir.rglob("*")):
            if path.is_file() and "locks" not in path.relative_to(cache_dir).parts:
                tar.add(path, arcname=str(path.relative_to(cache_dir)))
    size = archive.stat().st_size
    if size > limit_bytes:
        archive.unlink()
        return None
    return size


def unpack(archive: Path, cache_dir: Path) -> int:
    """Restore `archive` into `cache_dir` (created if missing); the number of files. Only plain files
    and folders inside `cache_dir` are written (tarfile's "data" filter)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        tar.extractall(cache_dir, members=members, filter="data")
    return len(members)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("cache_dir", type=Path)
    p.add_argument("archive", type=Path)
    p.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB)
    u = sub.add_parser("unpack")
    u.add_argument("archive", type=Path)
    u.add_argument("cache_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        size = pack(args.cache_dir, args.archive, int(args.limit_mib * 2**20))
        if size is None:
            print(f"compile cache {args.cache_dir} packs to more than {args.limit_mib} MiB: not kept")
            return 1
        print(f"compile cache {args.cache_dir} -> {args.archive} ({size / 2**20:.1f} MiB)")
    else:
        print(f"compile cache {args.archive} -> {args.cache_dir}: {unpack(args.archive, args.cache_dir)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
