"""A PortClient for the data-path and chaos tests: pipelined writes from a thread, strict
reply checking, process-tree inspection and a cleanup that never leaves a process behind.

The reply stream is read with a parser of our own (not ``FrameBuffer``) so that a partial
frame, a garbage length or trailing bytes are reported as such instead of as a hang.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from poolport.codec import etf
from poolport.protocol.framing import frame
from poolport.codec.terms import ImproperList
from portclient import A, PortClient, call

OK, ERROR = A("reply"), A("error")
SERVER, USER, PROTOCOL = A("server"), A("user"), A("protocol")
MAX_REPLY = 1 << 30  # no reply in these tests is near this: a longer header means a torn stream
HANG_S = 120.0  # a deadline only to turn a hang into a failure, never a speed assertion


def encode_frames(terms: Iterable[Any]) -> bytes:
    return b"".join(frame(etf.encode(t)) for t in terms)


def error_head(reply: Any) -> tuple | None:
    """``(Type, Code, Class)`` of an ``{error, {Type, Code, Class, Detail, Trace}}`` reply."""
    if (
        type(reply) is tuple
        and len(reply) == 2
        and reply[0] == ERROR
        and type(reply[1]) is tuple
        and len(reply[1]) == 5
    ):
        return tuple(reply[1][:3])
    return None


def is_crashed(reply: Any) -> bool:
    return error_head(reply) == (SERVER, 4, b"WorkerCrashed")


def is_timeout(reply: Any) -> bool:
    return error_head(reply) == (SERVER, 3, b"Timeout")


def short(term: Any, limit: int = 300) -> str:
    """A bounded description of a (possibly huge) term for failure messages."""
    text = _brief(term, 4)
    return text if len(text) <= limit else text[:limit] + "..."


def _brief(x: Any, depth: int) -> str:
    if type(x) in (bytes, bytearray):
        return repr(bytes(x[:40])) + (f"...({len(x)} bytes)" if len(x) > 40 else "")
    if depth <= 0:
        return f"<{type(x).__name__}>"
    if type(x) in (list, tuple):
        inner = ", ".join(_brief(v, depth - 1) for v in x[:6])
        more = f", ...({len(x)} items)" if len(x) > 6 else ""
        return ("[%s%s]" if type(x) is list else "(%s%s)") % (inner, more)
    if type(x) is dict:
        items = list(x.items())
        inner = ", ".join(f"{_brief(k, depth - 1)}: {_brief(v, depth - 1)}" for k, v in items[:6])
        return "{" + inner + (f", ...({len(items)} items)" if len(items) > 6 else "") + "}"
    if type(x) is ImproperList:
        return f"[{_brief(x.items, depth - 1)[1:-1]} | {_brief(x.tail, depth - 1)}]"
    text = repr(x)
    return text if len(text) <= 200 else text[:200] + "..."


def mismatch(expected: Any, got: Any) -> str:
    """Where a reply differs from the expected one, for binaries: lengths and first offset."""

    def payload(t: Any) -> Any:
        return t[1] if type(t) is tuple and len(t) == 2 and t[0] == OK else None

    e, g = payload(expected), payload(got)
    if type(e) is bytes and type(g) is bytes:
        first = next((k for k, (a, b) in enumerate(zip(e, g)) if a != b), min(len(e), len(g)))
        return (
            f"expected a {len(e)}-byte binary, got {len(g)} bytes, first difference at byte "
            f"{first}; got starts {g[:24]!r}"
        )
    return f"expected {short(expected)}, got {short(got)}"


# ---------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1])


def descendants(root: int) -> set[int]:
    """Every live (non-zombie) process below ``root``."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _is_python(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"python" in fh.read()
    except OSError:
        return False


def status_kb(pid: int, key: str) -> int:
    """A ``VmHWM``/``VmRSS``... line of /proc/<pid>/status, in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------- the client


class Server(PortClient):
    """``poolport serve`` over pipes with a writer thread and a strict reply reader."""

    def __init__(self, *flags: str, **kwargs: Any) -> None:
        super().__init__(*flags, **kwargs)
        self._buf = bytearray()
        self._pos = 0
        self._writer: threading.Thread | None = None
        self.write_error: BaseException | None = None
        self.bytes_written = 0
        self.known: set[int] = set()  # every process ever seen below the dispatcher
        self.slow_read: tuple[int, float] | None = None  # (bytes per read, pause before each)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.in_fd = self.proc.stdin.fileno()
        self.out_fd = self.proc.stdout.fileno()

    # -- writing (raw fd writes: no BufferedWriter lock a blocked thread could hold)

    def write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.in_fd, view[: 1 << 20])
            self.bytes_written += n
            view = view[n:]

    def send_async(self, chunks: Iterable[bytes], close: bool = False) -> threading.Thread:
        """Write ``chunks`` (lazily produced) from a thread; close stdin after them if asked."""
        assert self._writer is None or not self._writer.is_alive(), "one writer at a time"

        def run() -> None:
            try:
                for chunk in chunks:
                    self.write_all(chunk)
                if close:
                    self.close_stdin()
            except BaseException as exc:  # noqa: BLE001 - reported by join_writer()
                self.write_error = exc

        self._writer = threading.Thread(target=run, name="chaos-writer", daemon=True)
        self._writer.start()
        return self._writer

    def join_writer(self, timeout: float = HANG_S) -> None:
        if self._writer is not None:
            self._writer.join(timeout)
            assert not self._writer.is_alive(), "the writer is still blocked: stdin is not being read"
        if self.write_error is not None:
            raise AssertionError(
                f"writing requests failed: {self.write_error!r}\nstderr:\n{self.stderr_text()[-2000:]}"
            )

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    # -- reading

    def _fill(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out waiting for {what} "
                f"(server alive: {self.proc.poll() is None}); stderr tail:\n"
                f"{self.stderr_text()[-2000:]}"
            )
        r, _, _ = select.select([self.out_fd], [], [], min(left, 1.0))
        if not r:
            return
        if self.slow_read:  # a slow port owner: small reads with pauses between them
            time.sleep(self.slow_read[1])
        data = os.read(self.out_fd, self.slow_read[0] if self.slow_read else 4 << 20)
        if not data:
            try:  # let a dying server finish writing its traceback
                self.proc.wait(5)
            except Exception:  # noqa: BLE001 - still running: report what is there
                pass
            raise EOFError(
                f"poolport serve closed stdout while waiting for {what} "
                f"(exit {self.proc.poll()}); stderr tail:\n{self.stderr_text()[-2000:]}"
            )
        if self._pos > (1 << 24) and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def recv_frame(self, timeout: float = HANG_S) -> bytes:  # type: ignore[override]
        deadline = time.monotonic() + timeout
        while len(self._buf) - self._pos < 4:
            self._fill(deadline, "a reply header")
        size = int.from_bytes(self._buf[self._pos : self._pos + 4], "big")
        if size > MAX_REPLY:
            raise AssertionError(
                f"reply header announces {size} bytes: the reply stream is torn "
                f"(bytes {bytes(self._buf[self._pos : self._pos + 16])!r})"
            )
        while len(self._buf) - self._pos < 4 + size:
            self._fill(deadline, f"the rest of a {size}-byte reply")
        data = bytes(self._buf[self._pos + 4 : self._pos + 4 + size])
        self._pos += 4 + size
        return data

    def recv(self, timeout: float = HANG_S) -> Any:
        data = self.recv_frame(timeout)
        try:
            return etf.decode(data, max_inflated=1 << 31)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(
                f"a reply frame of {len(data)} bytes does not decode ({exc}): "
                f"the reply stream is torn; starts {data[:40]!r}"
            ) from None

    def request(self, term: Any, timeout: float = HANG_S) -> Any:
        self.write_all(frame(etf.encode(term)))
        return self.recv(timeout)

    def expect_eof(self, timeout: float = HANG_S) -> None:
        """No bytes after the last reply, then end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) > self._pos:
                raise AssertionError(
                    f"extra bytes after the last reply: {bytes(self._buf[self._pos : self._pos + 60])!r}"
                )
            try:
                self._fill(deadline, "end of stream")
            except EOFError:
                return

    # -- processes

    def children(self) -> set[int]:
        found = descendants(self.proc.pid)
        self.known |= found
        return found

    def worker_pid(self) -> int:
        reply = self.request(call("$poolport", "info"))
        assert reply[0] == OK, short(reply)
        return reply[1][A("worker_pid")]

    def vm_hwm_mb(self) -> float:
        return status_kb(self.proc.pid, "VmHWM") / 1024

    def finish(self, timeout: float = HANG_S) -> int:
        """Close stdin, expect no stray bytes, exit status 0, and no process left behind."""
        self.children()
        self.close_stdin()
        self.expect_eof(timeout)
        code = self.proc.wait(timeout)
        assert code == 0, f"exit status {code}; stderr tail:\n{self.stderr_text()[-2000:]}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in self.known):
            time.sleep(0.05)
        left = sorted(p for p in self.known if alive(p))
        assert not left, f"processes left behind after the server exited: {left}"
        return code

    def kill_all(self) -> None:
        """SIGKILL the dispatcher and everything below it (on failure: a hung test must not leak)."""
        pids = self.children() | {self.proc.pid}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self, timeout: float = 30.0) -> int:
        try:
            if self.proc.poll() is None:
                self.kill_all()
            if self._writer is not None:
                self._writer.join(10)
            return super().close(timeout)
        finally:
            for pid in self.known:  # workers orphaned by the dispatcher's death
                if alive(pid) and _is_python(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

    def __exit__(self, *exc: Any) -> None:
        self.close()


def peak_sampler(pid: int, stop: threading.Event, out: dict[str, float], period: float = 0.05) -> threading.Thread:
    """Sample VmHWM of ``pid`` until ``stop`` is set (VmHWM is a peak already; sampling just
    keeps the last value readable after the process has exited)."""

    def run() -> None:
        while not stop.is_set():
            kb = status_kb(pid, "VmHWM")
            if kb:
                out["hwm_mb"] = max(out.get("hwm_mb", 0.0), kb / 1024)
            stop.wait(period)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
