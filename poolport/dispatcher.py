"""The port loop: one process that owns the Erlang port and routes bytes.

::

    Erlang port                    dispatcher (this process)                       pool (loky)
    ───────────                    ─────────────────────────                       ───────────
    stdin ─▶ FrameBuffer ─▶ pending: deque[(seq, frames)] ─▶ run ══link══▶ Slot 0: worker_main
                                                                  ══link══▶ Slot 1: worker_main ...
    stdout ◀─ ReorderBuffer ◀──── chunks of framed replies ◀═════link════╝
                                    Progress (shared memory) ◀── started / finished / timeout

* The dispatcher never decodes a term. It splits stdin into frames, numbers
  them, and hands *runs* of consecutive frames to idle workers. Run length
  adapts to the measured cost per call: tiny calls travel in big runs (one
  link message per run, not per call), heavy calls one at a time so they
  spread over every worker.
* Workers decode, call and encode; their framed replies come back in chunks
  and the ReorderBuffer releases them to stdout strictly in request order.
* An ``{info, ...}`` packet rides in the same item as the call it precedes.
* Each worker runs in a loky executor of its own, so a crash breaks only that
  slot: loky reports how the process died, the slot gets a fresh process,
  the call it was running (known from Progress) gets an error reply and the
  calls queued behind it are re-run elsewhere (at-least-once for those).
* A call past its timeout has its worker killed and replaced the same way.
* Back-pressure: beyond ``max_in_flight`` unanswered requests stdin is not
  read, so the Erlang port buffers and memory stays bounded.
"""

from __future__ import annotations

import logging
import math
import os
import selectors
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from typing import Any

import loky

from . import bert, etf
from .config import Config
from .framing import FrameBuffer, Oversized, frame
from .link import HEADER, send_message
from .progress import Progress
from .reorder import ReorderBuffer
from .worker import worker_main

log = logging.getLogger("poolport")

READ_SIZE = 1 << 20  # bytes asked of stdin per read (more when a big frame is in progress)
RUN_TARGET_S = 0.002  # aim for runs of about this much work: long enough to amortise IPC
MAX_RUN_FRAMES = 2048  # never more calls than this in one run
MAX_RUN_BYTES = 4 << 20  # nor more bytes (a bigger single frame still goes alone)
PIPELINE_BYTES = 64 << 10  # a second run is queued to a busy worker only below this size
PIPELINE_COST_S = 0.001  # ... and only for calls cheaper than this
COST_SMOOTHING = 0.2  # weight of the newest measurement in the cost-per-call average
MAX_STARTUP_FAILURES = 5  # a slot that dies this many times before serving ends the server


class Run:
    """A run of consecutive requests sent to one worker; ``done`` counts answered ones."""

    __slots__ = ("start", "items", "base", "done", "sent_at")

    def __init__(self, items: list[tuple[int, bytes]], base: int, sent_at: float) -> None:
        self.start = items[0][0]
        self.items = items
        self.base = base  # how many requests the slot had received before this run
        self.done = 0
        self.sent_at = sent_at


class Slot:
    """One worker process: its loky executor, link socket, progress record and runs."""

    __slots__ = ("index", "executor", "future", "sock", "pid", "progress", "runs", "sent",
                 "rbuf", "killed", "failures", "restart_at", "progress_path")

    def __init__(self, index: int, progress_path: str) -> None:
        self.index = index
        self.progress_path = progress_path
        self.executor: Any = None
        self.future: Any = None
        self.sock: socket.socket | None = None
        self.pid = 0
        self.progress: Progress | None = None
        self.runs: deque[Run] = deque()
        self.sent = 0  # requests sent to the current process
        self.rbuf = bytearray()
        self.killed: str | None = None  # why we killed it, if we did
        self.failures = 0  # deaths in a row without serving anything
        self.restart_at = 0.0

    @property
    def ready(self) -> bool:
        return self.sock is not None and self.killed is None


class Dispatcher:
    """Owns the port's file descriptors and the pool; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, in_fd: int, out_fd: int) -> None:
        self.config = config
        self.in_fd, self.out_fd = in_fd, out_fd
        self.packet = config.packet
        self.frames = FrameBuffer(config.packet, config.max_frame_bytes)
        self.reorder = ReorderBuffer()
        self.pending: deque[tuple[int, bytes]] = deque()
        self.held_info: bytes = b""  # info packet(s) waiting for the call they precede
        self.next_seq = 0
        self.cost = 0.0  # smoothed seconds per call, measured from chunks
        self.closing = False
        self.deadline = math.inf
        self.sel = selectors.DefaultSelector()
        self.tmpdir = tempfile.mkdtemp(prefix="poolport-")
        self.address = os.path.join(self.tmpdir, "link")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        self.listener.listen(64)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.slots = [Slot(i, os.path.join(self.tmpdir, f"progress-{i}"))
                      for i in range(config.worker_count)]
        self.info = {"workers": len(self.slots), "os_pid": os.getpid(), "packet": config.packet,
                     "protocol": config.protocol}
        self.reading = False

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self.wake_w)
        try:
            for slot in self.slots:
                self._start(slot)
            self._set_reading(True)
            return self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._shutdown()

    def _loop(self) -> int:
        while True:
            now = time.monotonic()
            if self.closing and (self.in_flight == 0 or now >= self.deadline):
                if self.in_flight:
                    log.warning("grace period over: %d call(s) abandoned", self.in_flight)
                return 0
            for key, _ in self.sel.select(self._select_timeout(now)):
                tag = key.data
                if tag == "stdin":
                    self._read_stdin()
                elif tag == "listener":
                    self._accept()
                elif tag == "wake":
                    self._on_wake()
                else:
                    self._read_slot(tag)
            now = time.monotonic()
            self._check_timeouts(now)
            self._restart_due(now)
            self._schedule(now)
            self._write_ready()
            if not self.closing:
                self._set_reading(self.in_flight < self.config.max_in_flight)

    @property
    def in_flight(self) -> int:
        return self.next_seq - self.reorder.next_seq

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s: finishing in-flight calls", signal.Signals(signum).name)
        self._close_input()

    def _close_input(self) -> None:
        if not self.closing:
            self.closing = True
            self.deadline = time.monotonic() + self.config.shutdown_grace_ms / 1000
            self._set_reading(False)
            if self.held_info:
                log.warning("input ended after an info packet with no call; ignored")

    def _shutdown(self) -> None:
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()
        for slot in self.slots:
            if slot.executor is not None:
                slot.executor.shutdown(wait=True, kill_workers=True)
            if slot.progress is not None:
                slot.progress.close()
        self.listener.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ stdin

    def _set_reading(self, on: bool) -> None:
        if on != self.reading:
            if on:
                self.sel.register(self.in_fd, selectors.EVENT_READ, "stdin")
            else:
                self.sel.unregister(self.in_fd)
            self.reading = on

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.in_fd, max(READ_SIZE, self.frames.wanted()))
        except OSError as exc:
            log.error("cannot read stdin: %s", exc)
            data = b""
        if not data:
            log.info("stdin closed: finishing %d in-flight call(s)", self.in_flight)
            self._close_input()
            return
        self.frames.feed(data)
        p = self.packet
        pending, held = self.pending, self.held_info
        for item in self.frames.drain():
            if type(item) is Oversized:
                self._answer_now(bert.error(
                    bert.PROTOCOL, bert.BAD_FRAME, "FrameTooLarge",
                    f"frame of {item.size} bytes is over max_frame_bytes={self.config.max_frame_bytes}",
                    bare=self.config.protocol == "bare"), held)
                held = b""
            elif bert.is_info(item, p):
                held += item  # type: ignore[operator]
            else:
                pending.append((self.next_seq, held + item if held else item))  # type: ignore[operator]
                self.next_seq += 1
                held = b""
        self.held_info = held

    def _answer_now(self, term: Any, info: bytes) -> None:
        """Reply from the dispatcher itself (oversized frame): takes a sequence number like a call."""
        if info:
            log.debug("dropping info packet attached to an oversized frame")
        self.reorder.add(self.next_seq, 1, frame(etf.encode(term), self.packet))
        self.next_seq += 1

    # ------------------------------------------------------------------ output

    def _write_ready(self) -> None:
        ready = self.reorder.pop_ready()
        if ready:
            self._write(ready[0] if len(ready) == 1 else b"".join(ready))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.out_fd, view)
            except BlockingIOError:
                selectors.DefaultSelector().select(0.01)
                continue
            except BrokenPipeError:
                log.info("stdout closed by the port owner")
                self._close_input()
                self.deadline = 0.0
                return
            view = view[n:]

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, now: float) -> None:
        pending = self.pending
        if not pending:
            return
        ready = [s for s in self.slots if s.ready]
        if not ready:
            return
        by_cost = MAX_RUN_FRAMES if self.cost <= 0 else max(1, int(RUN_TARGET_S / self.cost))
        share = max(1, -(-len(pending) // len(self.slots)))  # starting slots get their share later
        size = min(by_cost, share, MAX_RUN_FRAMES)
        pipeline = self.cost < PIPELINE_COST_S
        for slot in sorted(ready, key=lambda s: len(s.runs)):
            if not pending:
                break
            if slot.runs and not (pipeline and len(slot.runs) < 2):
                continue
            items = self._take_run(size, PIPELINE_BYTES if slot.runs else MAX_RUN_BYTES)
            if not items:
                break
            self._send_run(slot, items, now)

    def _take_run(self, size: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Pop up to ``size`` items with consecutive sequence numbers and at most ``max_bytes``."""
        pending = self.pending
        first = pending[0]
        if len(first[1]) > max_bytes and max_bytes < MAX_RUN_BYTES:
            return []  # too big to queue behind a busy worker's run
        items = [pending.popleft()]
        total, seq = len(first[1]), first[0]
        while pending and len(items) < size:
            nseq, data = pending[0]
            if nseq != seq + 1 or total + len(data) > max_bytes:
                break
            items.append(pending.popleft())
            total += len(data)
            seq = nseq
        return items

    def _send_run(self, slot: Slot, items: list[tuple[int, bytes]], now: float) -> None:
        run = Run(items, slot.sent, now)
        slot.sent += len(items)
        slot.runs.append(run)
        payload = items[0][1] if len(items) == 1 else b"".join([data for _, data in items])
        try:
            send_message(slot.sock, len(items), payload)  # type: ignore[arg-type]
        except OSError as exc:
            self._on_death(slot, f"link lost while sending: {exc}")

    # ------------------------------------------------------------------ workers

    def _start(self, slot: Slot) -> None:
        slot.progress = slot.progress or Progress(slot.progress_path, create=True)
        slot.executor = loky.ProcessPoolExecutor(max_workers=1)
        slot.future = slot.executor.submit(
            worker_main, self.address, slot.progress_path, slot.index, self.config, self.info)
        slot.future.add_done_callback(self._wake)
        slot.restart_at = 0.0

    def _wake(self, _future: Any) -> None:
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass  # the pipe is full (a wake-up is already pending) or closed at shutdown

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        hello = b""
        conn.settimeout(5)
        try:
            while len(hello) < HEADER.size:
                chunk = conn.recv(HEADER.size - len(hello))
                if not chunk:
                    break
                hello += chunk
        except OSError:
            pass
        if len(hello) < HEADER.size:
            conn.close()
            return
        conn.settimeout(None)
        index, pid = HEADER.unpack(hello)
        if not 0 <= index < len(self.slots) or self.slots[index].sock is not None:
            log.warning("unexpected link connection (slot %d, pid %d)", index, pid)
            conn.close()
            return
        slot = self.slots[index]
        slot.sock, slot.pid, slot.sent = conn, pid, 0
        slot.rbuf.clear()
        slot.progress = Progress(slot.progress_path)
        self.sel.register(conn, selectors.EVENT_READ, slot)
        log.debug("worker %d ready (pid %d)", index, pid)

    def _on_wake(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        for slot in self.slots:
            if slot.future is not None and slot.future.done():
                self._on_death(slot, _describe_exit(slot.future))

    def _read_slot(self, slot: Slot) -> None:
        try:
            data = slot.sock.recv(max(READ_SIZE, _missing(slot.rbuf)))  # type: ignore[union-attr]
        except OSError as exc:
            data, reason = b"", f"link error: {exc}"
        else:
            reason = "link closed"
        if not data:
            self._on_death(slot, reason)
            return
        buf = slot.rbuf
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= HEADER.size:
            size, count = HEADER.unpack_from(buf, pos)
            end = pos + HEADER.size + size
            if end > n:
                break
            self._on_chunk(slot, count, bytes(buf[pos + HEADER.size : end]))
            pos = end
        del buf[:pos]

    def _on_chunk(self, slot: Slot, count: int, data: bytes) -> None:
        run = slot.runs[0]
        self.reorder.add(run.start + run.done, count, data)
        run.done += count
        slot.failures = 0
        if run.done == len(run.items):
            slot.runs.popleft()
            elapsed = time.monotonic() - run.sent_at
            per_call = elapsed / len(run.items)
            self.cost = per_call if self.cost <= 0 else (
                COST_SMOOTHING * per_call + (1 - COST_SMOOTHING) * self.cost)

    def _check_timeouts(self, now: float) -> None:
        for slot in self.slots:
            if not slot.runs or not slot.ready:
                continue
            snap = slot.progress.read()  # type: ignore[union-attr]
            if snap.running and snap.timeout_ms and now - snap.started_at > snap.timeout_ms / 1000:
                seq = self._seq_of(slot, snap.started - 1)
                if seq is None:
                    continue
                log.warning("call #%d exceeded %d ms on worker %d (pid %d): replacing the worker",
                            seq, snap.timeout_ms, slot.index, slot.pid)
                self._kill(slot, f"timeout of call #{seq}")

    def _select_timeout(self, now: float) -> float | None:
        soonest = self.deadline if self.closing else math.inf
        for slot in self.slots:
            if slot.restart_at:
                soonest = min(soonest, slot.restart_at)
            elif slot.runs and slot.ready:
                snap = slot.progress.read()  # type: ignore[union-attr]
                if snap.running and snap.timeout_ms:
                    soonest = min(soonest, snap.started_at + snap.timeout_ms / 1000)
                elif snap.timeout_ms or not snap.running:
                    soonest = min(soonest, now + 0.05)  # a call with a timeout may start any moment
        return None if soonest == math.inf else max(0.0, soonest - now)

    def _seq_of(self, slot: Slot, index: int) -> int | None:
        """Sequence number of the ``index``-th request sent to the slot's current process."""
        for run in slot.runs:
            if run.base <= index < run.base + len(run.items):
                return run.items[index - run.base][0]
        return None

    def _kill(self, slot: Slot, why: str) -> None:
        slot.killed = why
        try:
            os.kill(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _on_death(self, slot: Slot, reason: str) -> None:
        """Blame the call the process was running, re-queue the others, start a new process."""
        if slot.executor is None:
            return
        if slot.sock is not None:
            self.sel.unregister(slot.sock)
            slot.sock.close()
            slot.sock = None
        if slot.future is not None and not slot.future.done():
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                slot.future.exception(timeout=5)
            except Exception:  # noqa: BLE001 - only the process's end matters here
                pass
        if slot.future is not None and slot.future.done():
            reason = _describe_exit(slot.future)
        slot.executor.shutdown(wait=False, kill_workers=True)
        slot.executor = slot.future = None
        snap = slot.progress.read() if slot.progress is not None else None
        culprit = snap.started - 1 if snap is not None and snap.running else -1
        requeue: list[tuple[int, bytes]] = []
        for run in slot.runs:
            for i in range(run.done, len(run.items)):
                seq, data = run.items[i]
                if run.base + i == culprit:
                    self.reorder.add(seq, 1, frame(etf.encode(self._crash_error(slot, seq, snap, reason)),
                                                   self.packet))
                else:
                    requeue.append((seq, data))
        slot.runs.clear()
        if requeue:
            log.info("re-running %d call(s) that were queued on worker %d", len(requeue), slot.index)
            self.pending.extendleft(reversed(requeue))
        served = slot.sent > 0
        slot.failures = 0 if served else slot.failures + 1
        if slot.killed is None:
            log.error("worker %d (pid %d) died: %s", slot.index, slot.pid, reason)
        slot.killed, slot.pid, slot.sent = None, 0, 0
        if slot.progress is not None:
            slot.progress.close()
            slot.progress = None
        if slot.failures >= MAX_STARTUP_FAILURES:
            raise SystemExit(f"worker {slot.index} died {slot.failures} times before serving: {reason}")
        if self.closing:
            return
        delay = 0.0 if slot.failures == 0 else min(5.0, 0.1 * 2 ** slot.failures)
        slot.restart_at = time.monotonic() + delay
        if not delay:
            self._start(slot)

    def _crash_error(self, slot: Slot, seq: int, snap: Any, reason: str) -> Any:
        bare = self.config.protocol == "bare"
        if slot.killed is not None and snap.timeout_ms:
            return bert.error(bert.SERVER, bert.TIMEOUT, "Timeout",
                              f"call exceeded its timeout of {snap.timeout_ms} ms; worker replaced",
                              bare=bare)
        return bert.error(bert.SERVER, bert.WORKER_CRASHED, "WorkerCrashed",
                          f"worker process {slot.pid} died during this call: {reason}", bare=bare)

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.restart_at and now >= slot.restart_at and not self.closing:
                self._start(slot)


def _missing(buf: bytearray) -> int:
    """Bytes still missing for the link message at the head of ``buf``."""
    if len(buf) < HEADER.size:
        return 0
    size, _ = HEADER.unpack_from(buf)
    return HEADER.size + size - len(buf)


def _describe_exit(future: Any) -> str:
    exc = future.exception() if future.done() and not future.cancelled() else None
    if exc is None:
        return "worker task ended"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
