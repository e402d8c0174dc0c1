"""One job at a time per node registers its StreamingDatasets' shared memory (a node-wide file lock).

Streaming 0.13 gives each dataset a shared-memory prefix: every rank scans /dev/shm for the first
free one on its own, then the node's local leader registers it and the other ranks look it up. A
job that registers a prefix between two ranks' scans (another run starting on the node, or another
test process) makes them disagree, and the dataset fails with "shared memory registered does not
match local leader". Holding the lock from before the first scan until the leader has registered
closes that window for every job that takes it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch.distributed
from filelock import FileLock, Timeout
from streaming.base.distributed import maybe_init_dist
from streaming.base.world import World

log = logging.getLogger(__name__)

LOCK_NAME = "modernbert_train_streaming_registration.lock"
# Seconds between log lines while another job holds the lock.
WAIT_LOG_S = 30.0


def registration_lock_path() -> Path:
    """The node's lock file: in /dev/shm, the namespace the prefixes live in, where there is one
    (a per-job TMPDIR would give each job its own lock); in the temp folder otherwise (macOS)."""
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())) / LOCK_NAME


@contextlib.contextmanager
def streaming_registration_lock() -> Iterator[None]:
    """Build StreamingDatasets inside this on every rank: the local leader holds the node's lock
    for the block, and the other ranks enter it (and scan) only once their leader holds it.

    The lock is released when the leader leaves the block, by which time its dataset's prefix is
    registered and every rank of the job has scanned. A holder that dies releases it (flock).
    Ranks without a process group get a temporary one for the block, as StreamingDataset would
    make for its own __init__.
    """
    leader = World.detect().is_local_leader
    lock = FileLock(registration_lock_path(), mode=0o666) if leader else None
    if lock is not None:
        while True:
            try:
                lock.acquire(timeout=WAIT_LOG_S)
                break
            except Timeout:
                log.info("waiting for another job on this node to register its Streaming shared "
                         "memory (lock %s)", lock.lock_file)
    own_group = False
    try:
        own_group = maybe_init_dist()  # False with one rank or a group already made (the trainer's)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        yield
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
        if lock is not None:
            lock.release()
