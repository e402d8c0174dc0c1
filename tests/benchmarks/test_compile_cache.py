"""benchmarks/compile_cache.py: the compile cache survives a pack / unpack round trip, stays under
the size limit or is not kept, and unpacking writes nothing outside the cache folder."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from benchmarks import compile_cache


def _cache(root):
    (root / "fxgraph" / "ab").mkdir(parents=True)
    (root / "fxgraph" / "ab" / "entry").write_bytes(b"graph" * 100)
    (root / "triton" / "0" / "k1").mkdir(parents=True)
    (root / "triton" / "0" / "k1" / "kernel.cubin").write_bytes(os.urandom(2048))
    (root / "locks").mkdir()
    (root / "locks" / "held.lock").write_text("")
    return root


def test_round_trip_keeps_every_file_but_the_locks(tmp_path):
    cache = _cache(tmp_path / "cache")
    archive = tmp_path / "out" / "compile-cache.tar.xz"
    size = compile_cache.pack(cache, archive, limit_bytes=2**20)
    assert size == archive.stat().st_size > 0
    restored = tmp_path / "restored"
    assert compile_cache.unpack(archive, restored) == 2
    for rel in ("fxgraph/ab/entry", "triton/0/k1/kernel.cubin"):
        assert (restored / rel).read_bytes() == (cache / rel).read_bytes(), rel
    assert not (restored / "locks").exists()


def test_an_archive_over_the_limit_is_not_kept(tmp_path):
    cache = _cache(tmp_path / "cache")
    archive = tmp_path / "compile-cache.tar.xz"
    assert compile_cache.pack(cache, archive, limit_bytes=100) is None  # the random cubin alone is 2 KiB
    assert not archive.exists()
    assert compile_cache.main(["pack", str(cache), str(archive), "--limit-mib", "0.0001"]) == 1


def test_a_missing_cache_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compile cache at .*nowhere"):
        compile_cache.pack(tmp_path / "nowhere", tmp_path / "a.tar.xz", limit_bytes=2**20)


def test_unpack_writes_nothing_outside_the_cache_folder(tmp_path):
    archive = tmp_path / "evil.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.FilterError):
        compile_cache.unpack(archive, tmp_path / "cache")
    assert not (tmp_path / "escaped").exists()
