"""Drive a real ``poolport serve`` process over pipes, as an Erlang port would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from poolport.codec import etf
from poolport.protocol.framing import FrameBuffer, frame
from poolport.codec.terms import Atom

HANDLERS = str(Path(__file__).parent / "handlers")
ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = ROOT / "examples" / "seed"
SEED_CONFIG = str(SEED_DIR / "seed.yaml")


def A(name: str) -> Atom:
    return Atom(name)


def call(module: str, function: str, *args: Any) -> tuple:
    return (A("call"), A(module), A(function), list(args))


class PortClient:
    """A ``poolport serve`` child with helpers to send terms and read replies."""

    def __init__(
        self, *flags: str, packet: int = 4, config: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        cmd = [sys.executable, "-m", "poolport", "serve", "--packet", str(packet), "--python-path", HANDLERS, *flags]
        if config:
            cmd += ["--config", config]
        self.packet = packet
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: logs can never block the server
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, **(env or {})}
        )
        self.frames = FrameBuffer(packet, 1 << 31)
        self.ready: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, *terms: Any) -> None:
        self.send_raw(b"".join(frame(etf.encode(t), self.packet) for t in terms))

    def send_payload(self, payload: bytes) -> None:
        """One frame holding ``payload`` as it is (need not be valid ETF)."""
        self.send_raw(frame(payload, self.packet))

    def recv_frame(self, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        import select

        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from poolport serve")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                raise EOFError(f"poolport serve closed stdout; stderr:\n{self.stderr_text()}")
            self.frames.feed(data)
            self.ready.extend(f for f in self.frames.drain())  # type: ignore[misc]
        return self.ready.pop(0)[self.packet :]

    def recv(self, timeout: float = 30.0) -> Any:
        return etf.decode(self.recv_frame(timeout))

    def request(self, term: Any, timeout: float = 30.0) -> Any:
        self.send(term)
        return self.recv(timeout)

    def request_frame(self, term: Any, timeout: float = 30.0) -> bytes:
        """The reply's payload exactly as poolport wrote it (the bytes, not a decoded term)."""
        self.send(term)
        return self.recv_frame(timeout)

    def close(self, timeout: float = 30.0) -> int:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.log.close()

    def stderr_text(self) -> str:
        if self.log.closed:
            return "(closed)"
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __enter__(self) -> "PortClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
