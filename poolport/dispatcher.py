"""The port loop: one process that owns the Erlang port and routes bytes.

::

    Erlang port                    dispatcher (this process)                       pool (loky)
    ───────────                    ─────────────────────────                       ───────────
    stdin ─▶ FrameBuffer ─▶ pending: deque[Pending] ──────▶ run ══link══▶ Slot 0: worker_main
                                                                  ══link══▶ Slot 1: worker_main ...
    stdout ◀─ ReorderBuffer ◀──── chunks of framed replies ◀═════link════╝
    stdout ◀──────────────────── replies whose turn has come (Turn) ◀── workers
                                    Progress (shared memory) ◀── started / finished / timeout

* The dispatcher never decodes a term. It splits stdin into frames, numbers
  them, and hands *runs* of consecutive frames to idle workers. Run length
  adapts to the measured cost per call: tiny calls travel in big runs (one
  link message per run, not per call), heavy calls one at a time so they
  spread over every worker.
* Workers decode, call and encode. A worker whose replies are next in order
  (``Turn``, a shared counter of replies written) writes them to the port
  itself and only tells the dispatcher how many; otherwise its framed
  replies come back in chunks and the ReorderBuffer releases them to stdout
  strictly in request order, moving the turn on.
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
import select
import selectors
import shutil
import signal
import socket
import tempfile
import time
from bisect import bisect_right
from collections import deque
from typing import Any, Iterator

import loky

from . import bert, etf
from .config import Config
from .framing import FrameBuffer, Oversized, Segment, frame
from .link import HEADER, SEQ, Buffer, MessageReader, send_message, tune
from .pending import Pending, take_head
from .progress import Progress, Turn
from .reorder import ReorderBuffer
from .spin import spin
from .worker import worker_main

log = logging.getLogger("poolport")

READ_SMALL = 64 << 10  # bytes asked of stdin per read: a bigger request costs a big allocation
READ_BIG = 1 << 20  # ... unless a frame this big is in progress (the pipe is enlarged to this)
RUN_TARGET_S = 0.002  # aim for runs of about this much work: long enough to amortise IPC
MAX_RUN_FRAMES = 2048  # never more calls than this in one run
MAX_RUN_BYTES = 4 << 20  # nor more bytes (a bigger single frame still goes alone)
PIPELINE_BYTES = 64 << 10  # a second run is queued to a busy worker only below this size
PIPELINE_COST_S = 0.001  # ... and only for calls cheaper than this
MAX_QUEUED_RUNS = 2  # runs a worker may have at once: one running, the next already on its socket
COST_SMOOTHING = 0.2  # weight of the newest measurement in the cost-per-call average
MAX_STARTUP_FAILURES = 5  # a slot that dies this many times before serving ends the server


class Run:
    """Items ``first .. first + count - 1`` of a segment sent to one worker; ``done`` are answered."""

    __slots__ = ("start", "segment", "first", "count", "base", "done", "sent_at")

    def __init__(self, start: int, segment: Segment, first: int, count: int, base: int,
                 sent_at: float) -> None:
        self.start = start  # sequence number of the first item
        self.segment, self.first, self.count = segment, first, count
        self.base = base  # how many requests the slot had received before this run
        self.done = 0
        self.sent_at = sent_at

    def unanswered(self) -> Iterator[tuple[int, int]]:
        """(sequence number, index in the slot's stream) of every item not answered yet."""
        for k in range(self.done, self.count):
            yield self.start + k, self.base + k


class Slot:
    """One worker process: its loky executor, link socket, progress record and runs."""

    __slots__ = ("index", "executor", "future", "sock", "pid", "progress", "runs", "sent",
                 "reader", "killed", "failures", "restart_at", "progress_path", "idle_since")

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
        self.reader = MessageReader()
        self.killed: str | None = None  # why we killed it, if we did
        self.failures = 0  # deaths in a row without serving anything
        self.restart_at = 0.0
        self.idle_since = 0.0  # when its last run was answered

    @property
    def ready(self) -> bool:
        return self.sock is not None and self.killed is None


class Dispatcher:
    """Owns the port's file descriptors and the pool; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, in_fd: int, out_fd: int) -> None:
        self.config = config
        self.in_fd, self.out_fd = in_fd, out_fd
        self.packet = config.packet
        self.frames = FrameBuffer(config.packet, config.max_frame_bytes,
                                  attach=None if config.protocol == "bare" else bert.is_info)
        self.reorder = ReorderBuffer()
        self.pending: deque[Pending] = deque()
        self.queued = 0  # items in pending
        self.next_seq = 0
        self.cost = 0.0  # smoothed seconds per call, measured from chunks
        self.closing = False
        self.deadline = math.inf
        self.sel = selectors.PollSelector()  # poll, unlike epoll, also accepts a regular file as stdin
        self.tmpdir = tempfile.mkdtemp(prefix="poolport-")
        self.address = os.path.join(self.tmpdir, "link")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        self.listener.listen(64)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.slots = [Slot(i, os.path.join(self.tmpdir, f"progress-{i}"))
                      for i in range(config.worker_count)]
        self.turn_path = os.path.join(self.tmpdir, "turn")
        self.turn = Turn(self.turn_path, create=True)
        self.info = {"workers": len(self.slots), "os_pid": os.getpid(), "packet": config.packet,
                     "protocol": config.protocol}
        self.reading = False
        self.spin_s = config.idle_spin_us / 1e6
        self.stats = dict.fromkeys(("loops", "reads", "runs", "run_items", "chunks"), 0)  # for DEBUG

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
            self.stats["loops"] += 1
            now = time.monotonic()
            if self.closing and (self.in_flight == 0 or now >= self.deadline):
                if self.in_flight:
                    log.warning("grace period over: %d call(s) abandoned", self.in_flight)
                return 0
            events = spin(self._poll_now, self.spin_s) if self.spin_s else None
            for key, _ in events or self.sel.select(self._select_timeout(now)):
                tag = key.data
                if tag == "stdin":
                    self._read_stdin()
                elif tag == "listener":
                    self._accept()
                elif tag == "wake":
                    self._on_wake()
                else:
                    self._read_slot(tag, key.fileobj)
            now = time.monotonic()
            self._check_timeouts(now)
            self._restart_due(now)
            self._write_ready()
            if not self.closing:
                self._set_reading(self.in_flight < self.config.max_in_flight)
            self._schedule(now)  # last: a worker woken by a run may take this CPU right away

    def _poll_now(self) -> list[tuple[Any, int]]:
        return self.sel.select(0)

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
            if len(self.frames):
                log.warning("input ended inside a frame or after an info packet with no call")

    def _shutdown(self) -> None:
        log.debug("dispatcher stats: %s", self.stats)
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()
        for slot in self.slots:
            if slot.executor is not None:
                slot.executor.shutdown(wait=True, kill_workers=True)
            if slot.progress is not None:
                slot.progress.close()
        self.listener.close()
        self.turn.close()
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
            wanted = self.frames.wanted()
            data = os.read(self.in_fd, READ_SMALL if wanted <= READ_SMALL else min(wanted, READ_BIG))
        except OSError as exc:
            log.error("cannot read stdin: %s", exc)
            data = b""
        if not data:
            log.info("stdin closed: finishing %d in-flight call(s)", self.in_flight)
            self._close_input()
            return
        self.stats["reads"] += 1
        self.frames.feed(data)
        for segment in self.frames.segments():
            if type(segment) is Oversized:
                self.reorder.add(self.next_seq, 1, frame(etf.encode(bert.error(
                    bert.PROTOCOL, bert.BAD_FRAME, "FrameTooLarge",
                    f"frame of {segment.size} bytes is over max_frame_bytes="
                    f"{self.config.max_frame_bytes}", bare=self.config.protocol == "bare")), self.packet))
                self.next_seq += 1
            else:
                self.pending.append(Pending(segment, self.next_seq))  # type: ignore[arg-type]
                self.next_seq += len(segment)  # type: ignore[arg-type]
                self.queued += len(segment)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ output

    def _write_ready(self) -> None:
        ready = self.reorder.pop_ready()
        if ready:
            self._write(ready[0] if len(ready) == 1 else b"".join(ready))
            self.turn.value = self.reorder.next_seq  # after the write: now a worker may go on

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.out_fd, view)
            except BlockingIOError:
                select.select([], [self.out_fd], [], 1.0)  # the port owner is slow to read
                continue
            except BrokenPipeError:
                log.info("stdout closed by the port owner")
                self._close_input()
                self.deadline = 0.0
                return
            view = view[n:]

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, now: float) -> None:
        if not self.queued:
            return
        ready = [s for s in self.slots if s.ready and len(s.runs) < MAX_QUEUED_RUNS]
        if not ready:
            return
        by_cost = MAX_RUN_FRAMES if self.cost <= 0 else max(1, int(RUN_TARGET_S / self.cost))
        share = -(-self.queued // len(self.slots))  # starting slots get their share later
        size = min(by_cost, share, MAX_RUN_FRAMES)
        pipeline = self.cost < PIPELINE_COST_S
        ranked = sorted((_load(s, now), s.index) for s in ready)
        for (busy, _), index in ranked:
            if not self.pending:
                break
            if busy and not pipeline:
                continue
            self._send_run(self.slots[index], size, PIPELINE_BYTES if busy else MAX_RUN_BYTES, now)

    def _send_run(self, slot: Slot, size: int, max_bytes: int, now: float) -> None:
        """Send up to ``size`` items (at most ``max_bytes``, but at least one) from the queue head."""
        head = take_head(self.pending, size)
        seg, i = head.segment, head.pos
        bounds = seg.bounds
        j = min(i + size, len(bounds) - 1)
        if bounds[j] - bounds[i] > max_bytes:
            j = max(i + 1, bisect_right(bounds, bounds[i] + max_bytes, i + 1, j) - 1)
            if bounds[j] - bounds[i] > max_bytes and max_bytes < MAX_RUN_BYTES:
                return  # too big to queue behind a busy worker's run
        count = j - i
        run = Run(head.seq, seg, i, count, slot.sent, now)
        head.pos, head.seq = j, head.seq + count
        if head.pos == len(bounds) - 1:
            self.pending.popleft()
        self.queued -= count
        slot.sent += count
        slot.runs.append(run)
        self.stats["runs"] += 1
        self.stats["run_items"] += count
        try:
            send_message(slot.sock, count, [SEQ.pack(run.start), seg.data[bounds[i] : bounds[j]]])  # type: ignore[arg-type]
        except OSError as exc:
            self._on_death(slot, f"link lost while sending: {exc}")

    # ------------------------------------------------------------------ workers

    def _start(self, slot: Slot) -> None:
        slot.progress = slot.progress or Progress(slot.progress_path, create=True)
        slot.executor = loky.ProcessPoolExecutor(max_workers=1)
        slot.future = slot.executor.submit(
            worker_main, self.address, slot.progress_path, self.turn_path, slot.index, self.config,
            self.info)
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
        if pid == 0:  # -- the worker's worker_init raised (poolport.handler): stop serving at once
            conn.close()
            log.critical("worker_init failed in worker %d (traceback above)", index)
            raise SystemExit(3)
        if not 0 <= index < len(self.slots) or self.slots[index].sock is not None:
            log.warning("unexpected link connection (slot %d, pid %d)", index, pid)
            conn.close()
            return
        slot = self.slots[index]
        tune(conn)
        socket.send_fds(conn, [b"1"], [self.out_fd])  # so the worker can write replies whose turn came
        slot.sock, slot.pid, slot.sent = conn, pid, 0
        slot.reader = MessageReader()
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

    def _read_slot(self, slot: Slot, sock: Any) -> None:
        if sock is not slot.sock:
            return  # this socket's worker died earlier in the same batch of events
        try:
            messages = slot.reader.read_from(slot.sock)  # type: ignore[arg-type]
        except OSError as exc:
            self._on_death(slot, f"link error: {exc}")
            return
        if messages is None:
            self._on_death(slot, "link closed")
            return
        for count, data in messages:
            self._on_chunk(slot, count, data)

    def _on_chunk(self, slot: Slot, count: int, data: Buffer) -> None:
        run = slot.runs[0]
        self.stats["chunks"] += 1
        self.reorder.add(run.start + run.done, count, data)
        run.done += count
        slot.failures = 0
        if run.done == run.count:
            slot.runs.popleft()
            now = time.monotonic()
            elapsed = now - max(run.sent_at, slot.idle_since)  # not the time spent queued behind a run
            slot.idle_since = now
            per_call = elapsed / run.count
            self.cost = per_call if self.cost <= 0 else (
                COST_SMOOTHING * per_call + (1 - COST_SMOOTHING) * self.cost)

    def _check_timeouts(self, now: float) -> None:
        for slot in self.slots:
            if not slot.runs or not slot.ready or slot.progress.wake_at(now) > now:  # type: ignore[union-attr]
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
                soonest = min(soonest, slot.progress.wake_at(now))  # type: ignore[union-attr]
        return None if soonest == math.inf else max(0.0, soonest - now)

    def _seq_of(self, slot: Slot, index: int) -> int | None:
        """Sequence number of the ``index``-th request sent to the slot's current process."""
        for run in slot.runs:
            if run.base <= index < run.base + run.count:
                return run.start + index - run.base
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
        requeue: list[Pending] = []
        written = self.turn.value  # replies the worker wrote to the port before its end was seen
        for run in slot.runs:
            bounds = run.segment.bounds
            for seq, index in run.unanswered():
                item = run.first + seq - run.start
                if seq < written:
                    self.reorder.add(seq, 1, b"")
                elif index == culprit:
                    error = self._crash_error(slot, seq, snap, reason)
                    self.reorder.add(seq, 1, frame(etf.encode(error), self.packet))
                else:  # one pending entry per item: rare, and keeps the bookkeeping trivial
                    requeue.append(Pending(Segment(run.segment.data, bounds[item : item + 2]), seq))
        slot.runs.clear()
        if requeue:
            log.info("re-running %d call(s) that were queued on worker %d", len(requeue), slot.index)
            self.pending.extendleft(reversed(requeue))
            self.queued += len(requeue)
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


def _load(slot: Slot, now: float) -> tuple[int, float]:
    """Sort key of a slot for the next run: fewest unanswered runs first, then the most recently
    active, whose process is still polling (``idle_spin_us``) rather than asleep.

    A worker that has answered every call it was sent is idle already (or about to be), though
    its last replies or its report of them may still be on the way.
    """
    runs = slot.runs
    if not runs:
        return 0, -slot.idle_since
    if slot.progress is not None and slot.progress.finished >= slot.sent:
        return 0, -now
    return len(runs), 0.0


def _describe_exit(future: Any) -> str:
    exc = future.exception() if future.done() and not future.cancelled() else None
    if exc is None:
        return "worker task ended"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
