"""A local S3-compatible server on loopback, for object-storage checkpoints without a cloud account.

It is moto's standalone server (Apache-2.0, from PyPI, installed with the dev extras): a real HTTP server
speaking the S3 REST API, including conditional writes, so the object-store checkpoint backend is
exercised over the wire exactly as against S3 or SeaweedFS.  It keeps objects in memory: a test and bench
server, not a place for checkpoints you want to keep.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.stack.procs import StackError, free_port, port_open, spawn, tail

ACCESS_KEY = "prefstream-local"
SECRET_KEY = "prefstream-local-secret"
REGION = "us-east-1"


@dataclass
class LocalS3:
    """``with LocalS3(run_dir) as s3:`` a server on a free port; ``s3.env`` are the AWS_* settings for it."""

    run_dir: Path
    port: int = 0
    start_timeout_s: float = 30.0
    _proc: object = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    def start(self) -> "LocalS3":
        self.port = self.port or free_port()
        log = Path(self.run_dir) / "s3.log"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._proc = spawn(argv, log_path=log, cwd=Path(self.run_dir), env={**os.environ})
        deadline = time.monotonic() + self.start_timeout_s
        while not port_open(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StackError(f"the local S3 server did not start on port {self.port}; its log:\n{tail(log)}")
            time.sleep(0.1)
        return self

    def create_bucket(self, bucket: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY, region_name=REGION).create_bucket(Bucket=bucket)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except Exception:  # noqa: BLE001 - a server that ignores SIGTERM is killed
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
