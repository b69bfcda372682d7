"""The port loop: one process that owns the Erlang port and routes bytes.

::

    Erlang port                 dispatcher (this process, never blocks)                 pool (loky)
    ───────────                 ───────────────────────────────────────                 ───────────
    stdin ─▶ FrameBuffer ─▶ Ledger.admit ─▶ pending ─take_run─▶ Outbox ══link══▶ Slot 0: worker_main
                                                                  Outbox ══link══▶ Slot 1: worker_main ...
    stdout ◀─ Outbox ◀─ Ledger.release ◀─ reorder ◀── chunks of framed replies ◀═══link═══╝
                                    Progress (shared memory) ◀── started / finished / timeout

* The dispatcher is the only writer of stdout. Workers decode, call and
  encode, and send their framed replies back in chunks; the
  :class:`~poolport.server.ledger.Ledger` releases them strictly in request order.
  A worker killed at any instant can lose only a message the dispatcher
  never took in whole, so the port never sees a partial frame, a duplicate
  or a gap.
* The dispatcher never decodes a term. It splits stdin into frames, numbers
  them, and hands *runs* of consecutive frames to idle workers. Run length
  follows the measured cost of each function (:mod:`poolport.server.costs`): tiny
  calls travel in big runs (one link message per run, not per call), heavy
  and never-measured calls one at a time so they spread over every worker.
* Every descriptor is non-blocking; what a peer does not take waits in an
  :class:`~poolport.server.outbox.Outbox`. A worker stuck sending a huge reply, or
  an Erlang VM that stops reading, never stops the loop: it still reads
  every worker, checks timeouts, and notices stdin EOF and SIGTERM.
* Memory is bounded in bytes: beyond ``max_in_flight_bytes`` held (requests
  queued or in runs, replies waiting for their turn or for stdout, info
  frames waiting for their call) stdin is not read, and a worker whose
  replies are not next in order is not read either (it waits in its send).
* An ``{info, ...}`` packet rides in the same item as the call it precedes.
* Each worker runs in a loky executor of its own, so a crash breaks only that
  slot: the call it was running (known from Progress) gets an error reply,
  the calls queued behind it are re-run elsewhere once (at-least-once for
  those), and a call whose worker dies a second time is answered with an
  error (the ledger's poison-pill rule).
* A call past its timeout has its worker killed and replaced the same way.
* The pool changes while it serves (``'$poolport'`` requests, see
  :mod:`poolport.protocol.control`): ``resize`` adds slots or *retires* some (no new
  runs; removed once they owe nothing), and a reload first imports the
  handlers in a probe process (a failure leaves every worker as it was), then
  replaces the slots one at a time: a new slot starts, and once it serves an
  old one is retired. No call is lost or failed by either.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from typing import Any, Callable

import loky

from poolport.protocol import bert, control
from poolport.codec import etf
from poolport.config import WORKER_KEYS, Config, apply_live
from poolport.protocol.control import Tickets
from poolport.server.costs import SHARE_MIN_S, CostTable, NameReader, cut
from poolport.errors import ConfigError
from poolport.protocol.framing import MAX_ATTACHED, FrameBuffer, Oversized, Segment, frame
from poolport.server.ledger import Ledger, Run
from poolport.server.link import HEADER, REPORT_COUNT, SEQ, SMALL_MESSAGE, Buffer, MessageReader, tune
from poolport.server.outbox import Outbox
from poolport.server.progress import Counters, Progress
from poolport.server.spin import spin
from poolport.protocol.callbacks import CALLBACK_COUNT, HINT, is_reply, reply_target
from poolport.server.stream_worker import start_reply
from poolport.protocol.streams import (
    CONTROL,
    FAIL,
    STREAM_HEAD,
    Held,
    is_control,
    is_stream_request,
    item_kinds,
    may_hold_streams,
    parse_control,
)
from poolport.protocol.bert import request_name
from poolport.server.stats import StatsTable
from poolport.codec.terms import Atom
from poolport.server.watch import Watcher
from poolport.server.worker import probe_handlers, worker_main

log = logging.getLogger("poolport")
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
HANG_UP = select.POLLHUP | select.POLLERR | select.POLLNVAL

READ_SMALL = 64 << 10  # bytes asked of stdin per read: a bigger request costs a big allocation
READ_BIG = 1 << 20  # ... unless a frame this big is in progress (the pipe is enlarged to this)
MAX_RUN_FRAMES = 2048  # never more calls than this in one run
MAX_RUN_BYTES = 4 << 20  # nor more bytes (a bigger single frame still goes alone)
PIPELINE_BYTES = 64 << 10  # a second run is queued to a busy worker only below this size
MAX_QUEUED_RUNS = 2  # runs a worker may have at once: one running, the next already on its socket
MAX_STARTUP_FAILURES = 5  # a slot that dies this many times before serving ends the server
DEATH_WAIT_S = 2.0  # after a worker's link is lost, how long loky may take to say how it died
HELLO_WAIT_S = 5.0  # a link connection that has not said hello by then is dropped
STALL_S = 5.0  # a worker owing replies that runs no call and sends nothing this long is stuck
STALL_CHECK_S = 0.1  # how often workers owing replies are checked for that
MAX_WAIT_S = 3600.0  # the longest single wait in poll (a far deadline is simply waited for again)
MAX_WORKERS = 1024  # the most '$poolport':resize(N) accepts
RESTART_CAUSES = ("crash", "timeout", "memory", "reload")


class Poller:
    """``select.poll`` with a tag per descriptor (cheaper than ``selectors`` in the idle spin).

    Unlike ``selectors``, a descriptor may be watched for no event at all: poll still reports
    its hang-up or error. That is how stdin EOF is noticed while stdin is not being read
    (back-pressure), and a dead Erlang VM or worker while nothing is being written to it.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._tags: dict[int, Any] = {}

    def __contains__(self, fd: int) -> bool:
        return fd in self._tags

    def watch(self, fd: int, events: int, tag: Any) -> None:
        if fd in self._tags:
            self._poll.modify(fd, events)
        else:
            self._poll.register(fd, events)
        self._tags[fd] = tag

    def forget(self, fd: int) -> None:
        if self._tags.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def poll(self, timeout_s: float | None) -> list[tuple[Any, int]]:
        tags = self._tags
        ms = None if timeout_s is None else math.ceil(min(timeout_s, MAX_WAIT_S) * 1000)
        return [(tags[fd], mask) for fd, mask in self._poll.poll(ms)]


class Slot:
    """One worker process: its loky executor, link socket, progress record and outbox."""

    __slots__ = (
        "index",
        "executor",
        "future",
        "sock",
        "pid",
        "progress",
        "reader",
        "outbox",
        "killed",
        "failures",
        "restart_at",
        "progress_path",
        "idle_since",
        "events",
        "dying_since",
        "link_error",
        "culprit",
        "heard",
        "stall_mark",
        "stall_since",
        "retiring",
        "strict",
        "stream",
        "stream_open",
    )

    def __init__(self, index: int, progress_path: str) -> None:
        self.index = index
        self.progress_path = progress_path
        self.executor: Any = None
        self.future: Any = None
        self.sock: socket.socket | None = None
        self.pid = 0
        self.progress: Progress | None = None
        self.reader = MessageReader()
        self.outbox = Outbox()  # runs not yet taken by the worker
        self.events = 0  # what the poller watches on sock
        self.killed: str | None = None  # why we killed it, if we did
        self.culprit: int | None = None  # index of the call it was killed for (a timeout)
        self.failures = 0  # deaths in a row without serving anything
        self.restart_at = 0.0
        self.idle_since = 0.0  # when its last run was answered
        self.dying_since = 0.0  # its link is gone; waiting for loky to report its end
        self.link_error = ""
        self.heard = 0  # reads that brought data from the worker
        self.stall_mark: tuple[int, ...] | None = None  # see Dispatcher._check_stall
        self.stall_since = 0.0  # ... since then
        self.retiring: str | None = None  # why it gets no new runs and goes once it owes nothing
        self.strict = False  # started by a reload: a failure to start fails the reload
        self.stream: int | None = None  # the stream request it was sent: it gets nothing else meanwhile
        self.stream_open = False  # ... whose start reply came: its items follow, outside the reply order

    @property
    def ready(self) -> bool:
        return self.sock is not None and self.killed is None


class Rolling:
    """A reload in progress: the probe, then the old slots still to replace, one at a time."""

    __slots__ = ("generation", "executor", "probe", "old", "surge")

    def __init__(self, generation: int, executor: Any, probe: Any) -> None:
        self.generation = generation
        self.executor, self.probe = executor, probe  # the probe process and its future
        self.old: list[int] = []  # slots still running the code from before (ids)
        self.surge: int | None = None  # the new slot started to replace the next old one


class Hello:
    """A link connection that has not yet said which slot it serves."""

    __slots__ = ("sock", "data", "since")

    def __init__(self, sock: socket.socket, since: float) -> None:
        self.sock, self.data, self.since = sock, b"", since


class Dispatcher:
    """Owns the port's file descriptors and the pool; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, in_fd: int, out_fd: int, reread: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reread = reread  # the configuration file read again ('$poolport':reload_config())
        self.in_fd, self.out_fd = in_fd, out_fd
        os.set_blocking(out_fd, False)
        self.packet = config.packet
        self.bare = config.protocol == "bare"
        self.frames = FrameBuffer(config.packet, config.max_frame_bytes, attach=None if self.bare else bert.is_info)
        self.ledger = Ledger(config.worker_count)
        self.stdout = Outbox()
        self.write_stdout = functools.partial(os.writev, out_fd)
        self.write_stdout_one = functools.partial(os.write, out_fd)
        self.costs = CostTable()  # seconds per call of each function, measured from runs
        self.closing = False
        self.deadline = math.inf
        self.stall_check_at = 0.0  # when _chores next looks for stalled workers
        self.poller = Poller()
        self._poll_now = functools.partial(self.poller.poll, 0)
        sweep_stale_dirs()
        self.tmpdir = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
        self.address = os.path.join(self.tmpdir, "link")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.hellos: list[Hello] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.slots = [Slot(i, os.path.join(self.tmpdir, f"progress-{i}")) for i in range(config.worker_count)]
        self.by_id = {slot.index: slot for slot in self.slots}
        self.next_id = len(self.slots)  # slot ids are never reused
        self.target = len(self.slots)  # workers wanted (resize); slots being retired are extra
        self.table = StatsTable()
        self.restarts = dict.fromkeys(RESTART_CAUSES, 0)
        self.tickets = Tickets()
        self.rolling: Rolling | None = None
        self.hangup = False  # SIGHUP: reload
        self.retired: list[Slot] = []  # slots that get no new runs, until they owe nothing
        self.watcher: Watcher | None = None
        self.counters_path = os.path.join(self.tmpdir, "counters")
        self.counters = Counters(self.counters_path, create=True)
        self.info = {
            "workers": len(self.slots),
            "os_pid": os.getpid(),
            "packet": config.packet,
            "protocol": config.protocol,
        }
        self.info_dropped = 0  # bytes of info packets the FrameBuffer dropped, as already logged
        self.info_logged_at = -math.inf
        self.reading = False  # stdin is watched from the start; POLLIN is asked for while reading
        self.poller.watch(in_fd, 0, "stdin")
        self.stdout_watched = False
        self.spin_s = config.idle_spin_us / 1e6
        self.stats = dict.fromkeys(("loops", "reads", "runs", "run_items", "chunks"), 0)  # for DEBUG
        self.held = Held()  # stream frames waiting for their stream's start reply to be released
        self.streaming: dict[int, Slot] = {}  # stream id -> the slot serving it
        self._find_stream = None if self.bare else functools.partial(_find_stream, config.packet)
        self.names = names = NameReader(config.packet, self.bare)
        self._cut_idle = functools.partial(cut, self.costs, names)
        self._cut_busy = functools.partial(cut, self.costs, names, busy=True)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.poller.watch(self.listener.fileno(), POLLIN, "listener")
        self.poller.watch(self.wake_r, POLLIN, "wake")
        self.poller.watch(self.out_fd, 0, "stdout")  # no event asked: still told if the reader is gone
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        old_wakeup = signal.set_wakeup_fd(self.wake_w)
        try:
            for slot in self.slots:
                self._start(slot)
            self._watch_files()
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
            if self.closing and ((self.ledger.in_flight == 0 and not self.stdout) or now >= self.deadline):
                if self.ledger.in_flight or self.stdout:
                    log.warning("grace period over: %d call(s) abandoned", self.ledger.in_flight)
                return 0
            events = spin(self._poll_now, self.spin_s) if self.spin_s else None
            for tag, mask in events or self.poller.poll(self._select_timeout(now)):
                if type(tag) is Slot:
                    if mask & POLLOUT:
                        self._flush_slot(tag)
                    if mask & ~POLLOUT:  # data, or the worker's end closed
                        self._read_slot(tag)
                elif tag == "stdin":
                    if self.reading:
                        self._read_stdin()
                    elif mask & HANG_UP:  # EOF seen while not reading: the Erlang side is gone
                        log.info(
                            "stdin closed while not being read: finishing %d in-flight call(s)", self.ledger.in_flight
                        )
                        self._close_input()
                elif tag == "stdout":
                    if mask & HANG_UP:
                        self._stdout_gone("the port owner closed it")
                    else:
                        self._flush_stdout()
                elif tag == "listener":
                    self._accept(now)
                elif tag == "wake":
                    self._on_wake()
                else:
                    self._read_hello(tag)
            now = time.monotonic()
            self._chores(now)
            self._release()
            if not self.closing:
                self._set_reading(self._admitting())
            self._schedule(now)  # late: a worker woken by a run may take this CPU right away
            self._watch_slots()  # after: a run the worker has not taken in whole needs POLLOUT

    def _admitting(self) -> bool:
        """Whether stdin is read: below both limits, counting info frames waiting for their call.
        With nothing else held, reading goes on whatever those weigh: only the call they wait
        for can free them (and FrameBuffer keeps just the latest MAX_ATTACHED bytes of them)."""
        ledger = self.ledger
        if ledger.in_flight >= self.config.max_in_flight:
            return False
        held = ledger.held_bytes + self.stdout.size + self.held.size
        return held + self.frames.held < self.config.max_in_flight_bytes or (held == 0 and ledger.in_flight == 0)

    def _on_hangup(self, _signum: int, _frame: Any) -> None:
        self.hangup = True  # handled in _operate: a signal handler must not start processes

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s: finishing in-flight calls", signal.Signals(signum).name)
        self._close_input()

    def _close_input(self) -> None:
        if not self.closing:
            self.closing = True
            self.deadline = time.monotonic() + self.config.shutdown_grace_ms / 1000
            self._set_reading(False)
            self.poller.forget(self.in_fd)
            if len(self.frames):
                log.warning("input ended inside a frame or after an info packet with no call")

    def _shutdown(self) -> None:
        log.debug("dispatcher stats: %s", self.stats)
        if self.watcher is not None:
            self.watcher.stop()
        if self.rolling is not None and self.rolling.probe is not None:
            self.rolling.executor.shutdown(wait=False, kill_workers=True)
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()
            if slot.pid:
                _kill(slot.pid)
        for hello in self.hellos:
            hello.sock.close()
        for slot in self.slots:
            if slot.executor is not None:
                slot.executor.shutdown(wait=True, kill_workers=True)
            if slot.progress is not None:
                slot.progress.close()
        self.listener.close()
        self.counters.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ stdin

    def _set_reading(self, on: bool) -> None:
        """Read stdin or not; while not, stdin stays watched for no event, so EOF is still seen."""
        if on != self.reading:
            if self.in_fd in self.poller:
                self.poller.watch(self.in_fd, POLLIN if on else 0, "stdin")
            self.reading = on

    def _read_stdin(self) -> None:
        try:
            wanted = self.frames.wanted()
            data = os.read(self.in_fd, READ_SMALL if wanted <= READ_SMALL else min(wanted, READ_BIG))
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("cannot read stdin: %s", exc)
            data = b""
        if not data:
            log.info("stdin closed: finishing %d in-flight call(s)", self.ledger.in_flight)
            self._close_input()
            return
        self.stats["reads"] += 1
        self.frames.feed(data)
        for segment in self.frames.segments():
            if type(segment) is Oversized:
                seq = self.ledger.next_seq
                self.ledger.answer_now(
                    self._reply_frame(
                        seq,
                        bert.error(
                            bert.PROTOCOL,
                            bert.BAD_FRAME,
                            "FrameTooLarge",
                            f"frame of {segment.size} bytes is over max_frame_bytes={self.config.max_frame_bytes}",
                            bare=self.bare,
                        ),
                    )
                )
            elif self.bare:
                self.ledger.admit(segment)  # type: ignore[arg-type]
            elif not _may_hold_controls(segment):  # type: ignore[arg-type]
                self._admit(segment)  # type: ignore[arg-type]
            else:
                self._admit_with_controls(segment)  # type: ignore[arg-type]
        if self.frames.dropped != self.info_dropped and time.monotonic() - self.info_logged_at > 1.0:
            log.warning(
                "dropped %d bytes of {info, ...} packets: more than %d KiB of them waited for "
                "one call (only the latest are kept)",
                self.frames.dropped - self.info_dropped,
                MAX_ATTACHED >> 10,
            )
            self.info_dropped, self.info_logged_at = self.frames.dropped, time.monotonic()

    def _admit(self, segment: Segment) -> None:
        """Queue a segment's requests; answer the ``'$poolport'`` operations in it in place."""
        hits = control.find(segment, self.packet)
        if not hits:
            self.ledger.admit(segment, time.monotonic())
            return
        for piece in control.split(segment, hits):
            if isinstance(piece, Segment):
                self.ledger.admit(piece, time.monotonic())
            else:
                self.ledger.answer_now(self._reply_frame(self.ledger.next_seq, self._operation(piece)))

    def _admit_with_controls(self, segment: Segment) -> None:
        """Admit a segment's requests; its control frames (stream credit and cancel, callback
        replies) are no requests: they go to the worker they are for, and take no number."""
        data, bounds, packet = segment.data, segment.bounds, self.packet
        controls = item_kinds(data, bounds, 0, len(bounds) - 1, packet, _is_control)
        first = 0
        for k in controls + [len(bounds) - 1]:
            if k > first:
                self._admit(Segment(data, bounds[first : k + 1]))
            first = k + 1
        for k in controls:
            end = bounds[k + 1]
            start = bounds[k]
            while start + packet + int.from_bytes(data[start : start + packet], "big") < end:
                start += packet + int.from_bytes(data[start : start + packet], "big")  # past info frames
            if is_reply(data, start + packet, end):
                self._callback_reply(data[start + packet : end])
                continue
            try:
                control = parse_control(etf.decode(data[start + packet : end], max_depth=2, max_elements=8))
            except Exception:  # noqa: BLE001 - not a term after all: ignored like an unknown info packet
                control = None
            slot = self.streaming.get(control[0]) if control is not None else None
            if control is None or slot is None or not slot.stream_open or slot.sock is None:
                log.debug("stream control frame for no open stream ignored: %r", control)
                continue
            slot.outbox.push(HEADER.pack(CONTROL.size, 0) + CONTROL.pack(*control))
            self._flush_slot(slot)

    def _callback_reply(self, payload: bytes) -> None:
        """To the worker process that made the callback; dropped if that process is gone."""
        target = reply_target(payload, 0, len(payload))
        slot = next((s for s in self.slots if target and s.pid == target[0] and s.ready), None)
        if slot is None:
            log.debug("callback reply for no live worker dropped: %r", target)
            return
        slot.outbox.push(HEADER.pack(len(payload), CALLBACK_COUNT), payload)
        self._flush_slot(slot)

    def _reply_frame(self, seq: int, term: Any) -> bytes:
        """A reply made by the dispatcher itself, framed (and tagged) like a worker's."""
        payload = etf.encode(term, atom_encoding=self.config.atom_encoding)
        if self.config.reply_tags:
            payload = SEQ.pack(seq) + payload
        return frame(payload, self.packet)

    # ------------------------------------------------------------------ stdout

    def _release(self) -> None:
        ready = self.ledger.release()
        if self.held:
            ready += self.held.ready(self.ledger.reorder.next_seq)
        self._emit(ready)

    def _emit(self, ready: list[Any]) -> None:
        """Write frames to stdout, after those already waiting."""
        if not ready:
            return
        if len(ready) == 1:  # the usual case: one chunk
            try:
                if self.stdout.write_now(ready[0], self.write_stdout_one):
                    return
            except OSError as exc:  # EPIPE: the port owner is gone
                self._stdout_gone(str(exc))
                return
        else:
            self.stdout.push(*ready)
        self._flush_stdout()

    def _flush_stdout(self) -> None:
        try:
            done = self.stdout.flush(self.write_stdout)
        except OSError as exc:  # EPIPE: the port owner is gone
            self._stdout_gone(str(exc))
            return
        if done == self.stdout_watched and self.out_fd in self.poller:  # watch for room while something waits
            self.poller.watch(self.out_fd, 0 if done else POLLOUT, "stdout")
            self.stdout_watched = not done

    def _stdout_gone(self, why: str) -> None:
        """Nobody reads the replies any more: stop at once."""
        log.info("stdout closed by the port owner (%s)", why)
        self.stdout.clear()
        self._close_input()
        self.poller.forget(self.out_fd)
        self.deadline = 0.0

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, now: float) -> None:
        ledger = self.ledger
        if not ledger.queued:
            return
        runs = ledger.runs
        costs = self.costs
        ranked = sorted(
            (_load(s, ledger, costs, now), s.index)
            for s in self.slots
            if s.sock is not None
            and s.killed is None
            and not s.retiring
            and len(runs[s.index]) < MAX_QUEUED_RUNS
            and s.stream is None
        )
        if not ranked:
            return
        share = -(-ledger.queued // max(1, self.target))  # starting slots get their share later
        head = ledger.pending[0]
        bounds = head.segment.bounds
        key = self.names(head.segment.data, bounds[head.pos], bounds[head.pos + 1])
        size = min(max(share, costs.calls_in(key, SHARE_MIN_S)), MAX_RUN_FRAMES)  # cut shortens it
        for (rank, _), index in ranked:
            if not ledger.pending:
                break
            busy = rank not in (FREE, IDLE)
            run = ledger.take_run(
                index,
                size,
                PIPELINE_BYTES if busy else MAX_RUN_BYTES,
                now,
                strict=busy,
                find_stream=self._find_stream,
                # busy: only cheap calls, pipelined; a run is cut at the share once it holds SHARE_MIN_S
                cut=functools.partial(self._cut_busy if busy else self._cut_idle, share=share),
            )
            if run is None and rank >= BUSY:
                break  # what a busy worker may not take now, no busier one may either
            if run is not None:
                if run.waited:
                    self.table.waited(run.waited, run.count)
                slot = self.by_id[index]
                if run.stream:
                    slot.stream = run.start
                    self.streaming[run.start] = slot
                self._send_run(slot, run)

    def _send_run(self, slot: Slot, run: Run) -> None:
        slot.stall_mark = None  # the worker has a new reason to make progress
        self.stats["runs"] += 1
        self.stats["run_items"] += run.count
        head = HEADER.pack(run.size + SEQ.size, run.count) + SEQ.pack(run.start)
        if run.size < SMALL_MESSAGE:  # the usual case: joined, one send
            try:
                slot.outbox.write_now(head + run.data, slot.sock.send)  # type: ignore[union-attr]
            except OSError as exc:
                self._link_lost(slot, f"link lost while sending: {exc}")
            return  # what the worker did not take yet is sent on POLLOUT (_watch_slots)
        slot.outbox.push(head, run.data)
        self._flush_slot(slot)

    def _flush_slot(self, slot: Slot) -> None:
        if slot.sock is None:
            return
        try:
            slot.outbox.flush(slot.sock.sendmsg)
        except OSError as exc:
            self._link_lost(slot, f"link lost while sending: {exc}")

    def _watch_slots(self) -> None:
        """Read every worker, except those whose replies would only pile up (memory bound);
        watch for room on the sockets of workers that have not taken all their runs."""
        ledger = self.ledger
        holder = None  # when replies fill the budget, only the worker owing the next one is read
        if ledger.reply_bytes + self.stdout.size >= self.config.max_in_flight_bytes:
            holder = next((s for s in self.slots if ledger.holds_head(s.index)), None)
        for slot in self.slots:
            if slot.sock is None:
                continue
            events = POLLOUT if slot.outbox else 0
            if holder is None or holder is slot:
                events |= POLLIN
            if events != slot.events:  # 0 still reports the worker's end closing
                self.poller.watch(slot.sock.fileno(), events, slot)
                slot.events = events

    # ------------------------------------------------------------------ workers

    def _start(self, slot: Slot) -> None:
        slot.progress = slot.progress or Progress(slot.progress_path, create=True)
        slot.executor = loky.ProcessPoolExecutor(max_workers=1)
        slot.future = slot.executor.submit(
            worker_main,
            self.address,
            slot.progress_path,
            self.counters_path,
            slot.index,
            self.config,
            self.info,
            slot.strict,
        )
        slot.future.add_done_callback(self._wake)
        slot.restart_at = 0.0

    def _wake(self, _future: Any) -> None:
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass  # the pipe is full (a wake-up is already pending) or closed at shutdown

    def _accept(self, now: float) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        hello = Hello(conn, now)
        self.hellos.append(hello)
        self.poller.watch(conn.fileno(), POLLIN, hello)

    def _read_hello(self, hello: Hello) -> None:
        try:
            chunk = hello.sock.recv(HEADER.size - len(hello.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        hello.data += chunk
        if chunk and len(hello.data) < HEADER.size:
            return
        self.poller.forget(hello.sock.fileno())
        self.hellos.remove(hello)
        if len(hello.data) < HEADER.size:
            hello.sock.close()
            return
        index, pid = HEADER.unpack(hello.data)
        slot = self.by_id.get(index)
        if slot is None:  # removed meanwhile (resized away, or a reload's worker that failed)
            log.debug("link connection of a slot that is gone (slot %d, pid %d)", index, pid)
            hello.sock.close()
            return
        if pid == 0 and slot.strict:  # a worker started by a reload cannot serve
            hello.sock.close()
            self._reload_failed(slot, "a new worker could not start: its handlers did not import or worker_init failed")
            return
        if pid == 0:  # -- the worker's worker_init raised (poolport.handler): stop serving at once
            hello.sock.close()
            log.critical("worker_init failed in worker %d (traceback above)", index)
            raise SystemExit(3)
        if slot.sock is not None or slot.future is None or slot.dying_since:
            log.warning("unexpected link connection (slot %d, pid %d)", index, pid)
            hello.sock.close()
            return
        tune(hello.sock)
        slot.sock, slot.pid = hello.sock, pid
        slot.reader = MessageReader()
        slot.events = POLLIN
        self.poller.watch(hello.sock.fileno(), POLLIN, slot)
        slot.strict = False  # it imported its handlers: from now on it is a worker like the others
        log.debug("worker %d ready (pid %d)", index, pid)

    def _expire_hellos(self, now: float) -> None:
        for hello in [h for h in self.hellos if now - h.since > HELLO_WAIT_S]:
            self.poller.forget(hello.sock.fileno())
            self.hellos.remove(hello)
            hello.sock.close()

    def _on_wake(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        for slot in self.slots:
            if slot.future is not None and slot.future.done():
                self._link_lost(slot, "worker process ended")

    def _read_slot(self, slot: Slot) -> None:
        sock = slot.sock
        if sock is None:
            return  # this worker died earlier in the same batch of events
        try:
            messages = slot.reader.read_from(sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._link_lost(slot, f"link error: {exc}")
            return
        if messages is None:
            self._link_lost(slot, "link closed")
            return
        slot.heard += 1
        for count, data in messages:
            self._on_chunk(slot, count, data)
            if slot.sock is None:
                return
        self._release()  # at once: in lock-step this reply is what the Erlang side waits for

    def _on_chunk(self, slot: Slot, count: int, data: Buffer) -> None:
        self.stats["chunks"] += 1
        if count == 0:
            self._on_stream_message(slot, data)
            return
        if count == CALLBACK_COUNT:  # a frame for the Erlang side, outside the reply order
            self._emit([data])
            return
        if count == REPORT_COUNT:  # the statistics of the calls the next chunk answers (read later)
            self.table.receive(bytes(data))
            return
        try:
            run = self.ledger.answered(slot.index, count, data)
        except ValueError as exc:  # a worker that breaks the link protocol is replaced
            log.error("worker %d (pid %d): %s", slot.index, slot.pid, exc)
            self._kill(slot, "link protocol violation")
            self._link_lost(slot, "link protocol violation")
            return
        slot.failures = 0
        if run is not None and run.stream:
            expected = start_reply(run.start, self.config.atom_encoding)
            if (
                len(data) == self.packet + (SEQ.size if self.config.reply_tags else 0) + len(expected)
                and bytes(data[-len(expected) :]) == expected
            ):
                slot.stream_open = True  # the stream's items follow
            else:
                self._stream_over(slot)  # it did not start: its reply says why
        if run is not None:
            now = time.monotonic()
            elapsed = now - max(run.sent_at, slot.idle_since)  # not the time spent queued behind a run
            slot.idle_since = now
            if run.note:
                self.costs.learn(run.note, elapsed)

    def _on_stream_message(self, slot: Slot, data: Buffer) -> None:
        """Frames of the stream this worker serves: out now if its start has left, else held."""
        if len(data) < STREAM_HEAD.size:
            sid, last = None, 0
        else:
            sid, last = STREAM_HEAD.unpack_from(data)
        if sid is None or sid != slot.stream or not slot.stream_open:
            log.error("worker %d (pid %d): a stream message for no stream it serves", slot.index, slot.pid)
            self._kill(slot, "link protocol violation")
            self._link_lost(slot, "link protocol violation")
            return
        frames = memoryview(data)[STREAM_HEAD.size :]
        if len(frames):
            self._stream_frames(sid, frames)
        if last:
            self._stream_over(slot)

    def _stream_frames(self, sid: int, frames: Buffer) -> None:
        if sid < self.ledger.reorder.next_seq and not self.held:
            self._emit([frames])
        else:
            self.held.add(sid, frames)
            self._release()

    def _stream_over(self, slot: Slot) -> None:
        """The slot's stream ended (or never started): the worker is free for runs again."""
        if slot.stream is not None:
            self.streaming.pop(slot.stream, None)
        slot.stream, slot.stream_open = None, False

    def _chores(self, now: float) -> None:
        """Once per loop, one pass over the slots: timeouts, deaths to account, restarts due."""
        if self.hellos:
            self._expire_hellos(now)
        runs = self.ledger.runs
        watch = now >= self.stall_check_at
        if watch:
            self.stall_check_at = now + STALL_CHECK_S
        for slot in self.slots:
            if slot.sock is not None:
                if slot.killed is None and (runs[slot.index] or slot.stream_open):
                    if slot.progress.wake_at(now) <= now:  # type: ignore[union-attr]
                        self._check_timeout(slot, now)
                    elif watch:
                        self._check_stall(slot, now)
            elif slot.dying_since:
                self._check_death(slot, now)
            elif slot.restart_at and now >= slot.restart_at and (self.ledger.queued or not self.closing):
                self._start(slot)
        self._operate()

    def _check_timeout(self, slot: Slot, now: float) -> None:
        snap = slot.progress.read()  # type: ignore[union-attr]
        if snap.running and snap.timeout_ms and now - snap.started_at > snap.timeout_ms / 1000:
            seq = self.ledger.index_of(slot.index, snap.started - 1)
            if seq is None:
                if slot.stream_open and snap.started == self.ledger.sent[slot.index]:  # the stream's item
                    log.warning(
                        "stream #%d: an item took more than %d ms on worker %d (pid %d): replacing the worker",
                        slot.stream,
                        snap.timeout_ms,
                        slot.index,
                        slot.pid,
                    )
                    self._kill(slot, f"timeout of stream #{slot.stream}")
                    self.counters.add("timeouts")
                return
            log.warning(
                "call #%d exceeded %d ms on worker %d (pid %d): replacing the worker",
                seq,
                snap.timeout_ms,
                slot.index,
                slot.pid,
            )
            self._kill(slot, f"timeout of call #{seq}")
            slot.culprit = snap.started - 1
            self.counters.add("timeouts")

    def _check_stall(self, slot: Slot, now: float) -> None:
        """Replace a worker that owes replies yet runs no call and sends nothing for STALL_S.

        Between calls a worker only moves bytes (takes its runs, sends its replies), so a
        worker doing neither is stopped (SIGSTOP) or stuck, and no timeout can fire for it: a
        call's timeout starts when the call does (and covers resolving, decoding, encoding).
        Left alone it would hold back every later reply. A worker we do not read (the memory
        bound) is waiting for us, not stuck.
        """
        snap = slot.progress.read()  # type: ignore[union-attr]
        if snap.running:  # the handler's time: the call's timeout governs it
            slot.stall_mark = None
            return
        mark = (snap.started, snap.finished, slot.heard, slot.outbox.size)  # any of them moving
        if mark != slot.stall_mark or not slot.events & POLLIN:
            slot.stall_mark, slot.stall_since = mark, now
        elif now - slot.stall_since > STALL_S:
            log.warning(
                "worker %d (pid %d) owes %d call(s) but has run none and sent nothing for "
                "%.0f s (stopped?): replacing it",
                slot.index,
                slot.pid,
                self.ledger.sent[slot.index] - snap.finished,
                now - slot.stall_since,
            )
            self._kill(slot, "stalled between calls")

    def _select_timeout(self, now: float) -> float | None:
        soonest = self.deadline if self.closing else math.inf
        for slot in self.slots:
            if slot.restart_at:
                soonest = min(soonest, slot.restart_at)
            elif slot.dying_since:
                soonest = min(soonest, slot.dying_since + DEATH_WAIT_S)
            elif (self.ledger.runs[slot.index] or slot.stream_open) and slot.ready:
                soonest = min(soonest, slot.progress.wake_at(now))  # type: ignore[union-attr]
        if self.hellos:
            soonest = min(soonest, min(h.since for h in self.hellos) + HELLO_WAIT_S)
        return None if soonest == math.inf else max(0.0, soonest - now)

    def _kill(self, slot: Slot, why: str) -> None:
        slot.killed = why
        if slot.pid:
            _kill(slot.pid)

    def _link_lost(self, slot: Slot, reason: str) -> None:
        """The worker is gone or going: stop talking to it; account for it once loky saw it end."""
        if slot.executor is None or slot.dying_since:
            return
        if slot.sock is not None:
            self.poller.forget(slot.sock.fileno())
            slot.sock.close()
            slot.sock = None
            slot.events = 0
        slot.outbox.clear()
        if slot.pid:
            _kill(slot.pid)  # whatever state it is in, it will not serve again
        slot.dying_since = time.monotonic()
        slot.link_error = reason
        self._check_death(slot, slot.dying_since)

    def _check_death(self, slot: Slot, now: float) -> None:
        """Account for a worker whose link is gone once loky saw it end (or it took too long)."""
        if slot.future is None or slot.future.done() or now - slot.dying_since >= DEATH_WAIT_S:
            reason = _describe_exit(slot.future) if slot.future is not None and slot.future.done() else slot.link_error
            self._on_death(slot, reason)

    def _on_death(self, slot: Slot, reason: str) -> None:
        """Blame the call the process was running, re-queue the others, start a new process."""
        slot.dying_since = 0.0
        slot.executor.shutdown(wait=False, kill_workers=True)
        slot.executor = slot.future = None
        snap = slot.progress.read() if slot.progress is not None else None
        running = snap.started - 1 if snap is not None and snap.running else None
        if slot.culprit is not None:  # killed for a timeout: that call, even if it just finished
            running = slot.culprit

        def blame(seq: int, why: str) -> bytes:
            return self._reply_frame(seq, self._crash_error(slot, snap, reason, why))

        served = self.ledger.sent[slot.index] > 0
        timed_out = slot.killed is not None and slot.killed.startswith("timeout")
        if running is not None:  # a call no worker could count: count it here
            item = self.ledger.item(slot.index, running)
            name = request_name(item, self.packet) if item is not None else None  # a rare copy
            if name is not None:
                self.table.failed(name, timeout=timed_out)
        requeued = self.ledger.lost(slot.index, running, blame)
        if slot.retiring is None and not (slot.strict and not served):  # (a reload's failed start: not a restart)
            cause = "timeout" if timed_out else "memory" if "MemoryError" in reason else "crash"
            self.restarts[cause] += 1
        if slot.stream_open:  # its consumer learns it from the stream's last frame
            sid = slot.stream
            error = self._crash_error(slot, snap, reason, "stream")[1]
            payload = etf.encode((FAIL, sid, error), atom_encoding=self.config.atom_encoding)
            self._stream_frames(sid, frame(SEQ.pack(sid) + payload if self.config.reply_tags else payload, self.packet))  # type: ignore[arg-type]
        self._stream_over(slot)
        self.counters.add("worker_deaths")
        self.counters.set("reruns", self.ledger.reruns)
        self.counters.set("abandoned", self.ledger.abandoned)
        if requeued:
            log.info("re-running %d call(s) that were queued on worker %d", requeued, slot.index)
        slot.failures = 0 if served else slot.failures + 1
        if slot.killed is None:
            log.error("worker %d (pid %d) died: %s", slot.index, slot.pid, reason)
        slot.killed, slot.culprit, slot.pid, slot.stall_mark = None, None, 0, None
        slot.idle_since = 0.0
        if slot.progress is not None:
            slot.progress.close()
            slot.progress = None
        if slot.retiring is not None:  # it was going anyway: what it held runs elsewhere
            self._remove(slot)
            return
        if slot.strict and not served:
            # (its failed hello, if it sent one, may not have been read before its end was seen)
            self._reload_failed(slot, f"a new worker could not start: it ended before serving ({reason})")
            return
        if slot.failures >= MAX_STARTUP_FAILURES:
            raise SystemExit(f"worker {slot.index} died {slot.failures} times before serving: {reason}")
        if self.closing and not self.ledger.queued:
            return  # closing with nothing left for a new process to do
        delay = 0.0 if slot.failures == 0 else min(5.0, 0.1 * 2**slot.failures)
        slot.restart_at = time.monotonic() + delay
        if not delay:
            self._start(slot)

    def _crash_error(self, slot: Slot, snap: Any, reason: str, why: str) -> Any:
        if why == "again":
            detail = (
                f"the worker holding this call died ({reason}), and so did a worker before: "
                "this call may be what kills them, so it is not run again"
            )
            return bert.error(bert.SERVER, bert.WORKER_CRASHED, "WorkerCrashed", detail, bare=self.bare)
        if slot.killed is not None and slot.killed.startswith("timeout") and snap is not None:
            what = "a stream item took longer than" if why == "stream" else "call exceeded"
            return bert.error(
                bert.SERVER,
                bert.TIMEOUT,
                "Timeout",
                f"{what} its timeout of {snap.timeout_ms} ms; worker replaced",
                bare=self.bare,
            )
        return bert.error(
            bert.SERVER,
            bert.WORKER_CRASHED,
            "WorkerCrashed",
            f"worker process {slot.pid} died during this call: {reason}",
            bare=self.bare,
        )

    # ------------------------------------------------------------------ operations ('$poolport')

    def _operation(self, item: bytes) -> Any:
        """The reply term to a ``'$poolport'`` operation (see poolport.protocol.control)."""
        request = control.parse(item, self.packet)
        args, name = request.args, request.function
        if args is None:
            return bert.error(bert.PROTOCOL, bert.BAD_REQUEST, "BadRequest", f"unreadable '$poolport':{name} request")
        if name == "stats" and not args:
            result: Any = self._stats_term()
        elif name == "resize" and len(args) == 1 and type(args[0]) is int and 1 <= args[0] <= MAX_WORKERS:
            self._resize(args[0])
            result = Atom("ok")
        elif name == "reload" and not args:
            result = self.tickets.request()
            log.info("reload requested (ticket %d)", result)
        elif name == "reload_status" and len(args) == 1 and type(args[0]) is int:
            status = self.tickets.status(args[0])
            result = (Atom("error"), status[1]) if type(status) is tuple else Atom(status)
        elif name == "reload_config" and not args:
            result = self._reload_config()
        else:
            return bert.error(
                bert.PROTOCOL, bert.BAD_REQUEST, "BadRequest", f"bad arguments for '$poolport':{name}: {args!r:.200}"
            )
        return bert.noreply() if request.kind == "cast" else bert.reply(result)

    def _stats_term(self) -> dict[Atom, Any]:
        self.table.settle()
        if self.table.bad_reports:
            log.error("%d statistics report(s) from workers could not be read", self.table.bad_reports)
            self.table.bad_reports = 0
        return {
            Atom("workers"): self.target,
            Atom("processes"): len(self.slots),
            Atom("ready"): sum(1 for s in self.slots if s.sock is not None and not s.retiring),
            Atom("queue_depth"): self.ledger.queued,
            Atom("in_flight"): self.ledger.in_flight,
            Atom("queue_wait"): self.table.queue_wait.summary(),
            Atom("functions"): self.table.functions_term(),
            Atom("worker_restarts"): {Atom(k): v for k, v in self.restarts.items()},
            Atom("reloads"): self.tickets.started,
            Atom("reloading"): self.tickets.running or self.tickets.due(),
        }

    def _reload_config(self) -> Any:
        """Read the configuration file again and apply what can change live (config.LIVE_KEYS)."""
        if self.reread is None:
            return (Atom("error"), "this server was not started from a configuration it can read again")
        try:
            new = self.reread()
        except ConfigError as exc:
            return (Atom("error"), str(exc))
        old = self.config
        self.config, applied, restart = apply_live(old, new)
        config = self.config
        self.frames.max_frame = config.max_frame_bytes
        self.spin_s = config.idle_spin_us / 1e6
        logging.getLogger().setLevel(config.log_level)
        if "workers" in applied and config.worker_count != self.target:
            self._resize(config.worker_count)
        if config.reload != old.reload:
            self._watch_files()
        ticket = self.tickets.request() if any(k in WORKER_KEYS for k in applied) else None
        log.info(
            "configuration read again: applied %s%s; needs a restart: %s",
            applied or "nothing",
            f" (workers reload: ticket {ticket})" if ticket else "",
            restart or "nothing",
        )
        return {
            Atom("applied"): [Atom(k) for k in applied],
            Atom("needs_restart"): [Atom(k) for k in restart],
            Atom("reload"): ticket,
        }

    def _watch_files(self) -> None:
        """Start (or stop) polling the handler files, as ``reload: {watch: ...}`` says."""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.config.reload.watch:
            self.watcher = Watcher(
                self.config.modules, self.config.python_path, self.config.reload.poll_ms / 1000, self.wake_w
            )
            self.watcher.start()

    def _operate(self) -> None:
        """Once per loop: reloads asked for (request, SIGHUP, file change), their progress,
        and the removal of retired slots that owe nothing any more."""
        tickets = self.tickets
        if not (
            self.hangup
            or self.rolling
            or self.retired
            or tickets.wanted > tickets.started
            or (self.watcher is not None and self.watcher.changed)
        ):
            return  # the usual case: this runs on every loop
        if self.hangup:
            self.hangup = False
            log.info("SIGHUP: reloading the workers (ticket %d)", self.tickets.request())
        if self.watcher is not None and self.watcher.changed:
            self.watcher.changed = False
            log.info("a handler file changed: reloading the workers (ticket %d)", self.tickets.request())
        if self.closing:
            if self.rolling is not None:
                self._finish_reload("the server is shutting down")
        elif self.rolling is None and self.tickets.due():
            self._start_reload()
        if self.rolling is not None:
            self._roll()
        runs = self.ledger.runs
        for slot in [s for s in self.retired if not s.dying_since and not runs[s.index]]:
            self._remove(slot)

    def _start_reload(self) -> None:
        generation = self.tickets.start()
        executor = loky.ProcessPoolExecutor(max_workers=1)
        probe = executor.submit(probe_handlers, self.config)
        probe.add_done_callback(self._wake)
        self.rolling = Rolling(generation, executor, probe)
        log.info("reload %d: importing the handler modules in a new process first", generation)

    def _roll(self) -> None:
        """One step of the reload: the probe's verdict, then one old slot at a time replaced by a
        new one (started first, so the pool never has fewer workers than it had)."""
        rolling = self.rolling
        assert rolling is not None
        if rolling.probe is not None:
            if not rolling.probe.done():
                return
            try:
                error = rolling.probe.result()
            except BaseException as exc:  # noqa: BLE001 - the probe process died, say how
                error = f"the process importing the new code died: {type(exc).__name__}: {exc}"
            rolling.executor.shutdown(wait=False, kill_workers=True)
            rolling.probe = None
            if error:
                self._finish_reload(error)
                return
            rolling.old = [s.index for s in self.slots if not s.retiring]
            log.info("reload %d: the new code imports; replacing %d worker(s)", rolling.generation, len(rolling.old))
        if rolling.surge is not None:
            surge = self.by_id.get(rolling.surge)
            if surge is not None and not surge.ready:
                return  # still starting
            rolling.surge = None
            for index in rolling.old:
                old = self.by_id.get(index)
                if old is not None and not old.retiring:
                    rolling.old.remove(index)
                    self._retire(old, "reload")
                    break
        rolling.old = [i for i in rolling.old if i in self.by_id and not self.by_id[i].retiring]
        if not rolling.old:
            self._finish_reload(None)
        elif rolling.surge is None:
            rolling.surge = self._add_slot(strict=True).index

    def _finish_reload(self, error: str | None) -> None:
        rolling = self.rolling
        assert rolling is not None
        if rolling.probe is not None:
            rolling.executor.shutdown(wait=False, kill_workers=True)
        self.rolling = None
        self.tickets.finish(error)
        if error is None:
            log.info("reload %d done: every worker runs the new code", rolling.generation)
        else:
            log.error("reload %d failed; the workers that were serving go on:\n%s", rolling.generation, error)

    def _reload_failed(self, slot: Slot, why: str) -> None:
        """A new slot of a reload could not start: drop it; the old slots go on serving."""
        log.error("worker %d: %s", slot.index, why)
        if self.rolling is not None and self.rolling.surge == slot.index:
            self._finish_reload(f"{why} (see the log of poolport serve)")
        self._retire(slot, "failed to start")
        if not slot.dying_since and not self.ledger.runs[slot.index]:
            self._remove(slot)

    def _add_slot(self, strict: bool = False) -> Slot:
        slot = Slot(self.next_id, os.path.join(self.tmpdir, f"progress-{self.next_id}"))
        self.next_id += 1
        slot.strict = strict
        self.slots.append(slot)
        self.by_id[slot.index] = slot
        self.ledger.add_slot(slot.index)
        self._start(slot)
        return slot

    def _retire(self, slot: Slot, why: str) -> None:
        """No new runs for this slot; :meth:`_operate` removes it once it owes nothing."""
        if slot.retiring is None:
            self.retired.append(slot)
        slot.retiring = why
        log.debug("worker %d (pid %d) retired (%s)", slot.index, slot.pid, why)

    def _remove(self, slot: Slot) -> None:
        """End a slot that owes nothing: its process, its link, its bookkeeping."""
        self.slots.remove(slot)
        del self.by_id[slot.index]
        if slot.retiring is not None:
            self.retired.remove(slot)
        if slot.sock is not None:
            self.poller.forget(slot.sock.fileno())
            slot.sock.close()
            slot.sock = None
        if slot.executor is not None:
            slot.executor.shutdown(wait=False, kill_workers=True)
            slot.executor = slot.future = None
        if slot.progress is not None:
            slot.progress.close()
            slot.progress = None
        with contextlib.suppress(OSError):
            os.unlink(slot.progress_path)
        self.ledger.remove_slot(slot.index)
        if slot.retiring == "reload":
            self.restarts["reload"] += 1

    def _resize(self, workers: int) -> None:
        """Grow at once; shrink by retiring slots (idle ones, and those a reload would replace,
        first): a busy one finishes the calls it was sent."""
        self.target = workers
        self.info["workers"] = workers
        active = [s for s in self.slots if not s.retiring]
        if self.rolling is not None and self.rolling.surge is not None:
            active = [s for s in active if s.index != self.rolling.surge]  # counted among the old
        old = set(self.rolling.old) if self.rolling is not None else set()
        if workers > len(active):
            for _ in range(workers - len(active)):
                self._add_slot()
        else:
            runs = self.ledger.runs
            active.sort(key=lambda s: (s.index not in old, len(runs[s.index]), -s.index))
            for slot in active[: len(active) - workers]:
                self._retire(slot, "resize")
        log.info("resized to %d worker(s)", workers)


def _may_hold_controls(segment: Segment) -> bool:
    data, start, end = segment.data, segment.bounds[0], segment.bounds[-1]
    return may_hold_streams(data, start, end) or data.find(HINT, start, end) != -1


def _is_control(data: bytes, start: int, end: int) -> bool:
    return is_control(data, start, end) or is_reply(data, start, end)


def _find_stream(packet: int, data: bytes, bounds: list[int], i: int, j: int) -> int | None:
    """The index of the first stream request among items ``i .. j - 1`` (``Ledger.take_run``)."""
    if not may_hold_streams(data, bounds[i], bounds[j]):
        return None
    found = item_kinds(data, bounds, i, j, packet, is_stream_request)
    return found[0] if found else None


FREE, SOON, IDLE, BUSY = range(4)  # _load's ranks, best first


def _load(slot: Slot, ledger: Ledger, costs: CostTable, now: float) -> tuple[int, float]:
    """Sort key of a slot for the next run, best first:

    * ``FREE``: it has answered every call it was sent (its replies may still be on the
      way): awake and free;
    * ``SOON``: it runs calls expected to be done within ``SHARE_MIN_S``: cheap work stays on
      it rather than waking another worker (see :mod:`poolport.server.costs`), the lowest index
      first, so one worker keeps a trickle. A heavy call is never expected to be done that soon,
      and a worker more than ``SHARE_MIN_S`` late on its estimate (a call slower than its
      function's record) is not trusted to be: nothing more waits behind it while others idle;
    * ``IDLE``: the most recently active first, whose process is still polling
      (``idle_spin_us``) rather than asleep;
    * ``BUSY`` and more: fewest unanswered runs first.

    ``SOON`` and ``BUSY`` slots are sent only cheap calls (pipelined behind what they run).
    """
    runs = ledger.runs[slot.index]
    if not runs:
        return IDLE, -slot.idle_since
    if slot.progress is not None and slot.progress.finished >= ledger.sent[slot.index]:
        return FREE, -now
    started = max(runs[0].sent_at, slot.idle_since)  # when the worker got to its first run
    left = started + sum(costs.expected(run.note) for run in runs) - now
    if -SHARE_MIN_S < left < SHARE_MIN_S:
        return SOON, slot.index
    return BUSY + len(runs) - 1, 0.0


TMP_PREFIX = "poolport-"  # + the dispatcher's pid + "-" + random: its private directory


def sweep_stale_dirs(root: str | None = None) -> list[str]:
    """Remove the private directories of dispatchers that died without cleaning up (kill -9).

    Only directories of this user, named ``poolport-<pid>-...``, whose pid no longer runs.
    A pid reused by another process keeps its directory until a later sweep: harmless.
    """
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        pid_text = name[len(TMP_PREFIX) :].split("-", 1)[0]
        if not name.startswith(TMP_PREFIX) or not pid_text.isdigit():
            continue
        path = os.path.join(root, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            continue  # alive (EPERM: another user's process) or gone meanwhile
    if removed:
        log.info("removed %d directory(ies) left by dispatchers that were killed", len(removed))
    return removed


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe_exit(future: Any) -> str:
    exc = future.exception() if future.done() and not future.cancelled() else None
    if exc is None:
        return "worker task ended"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
