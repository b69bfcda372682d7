"""Sans-IO: what one call of each function costs, learned from runs, and where to cut a run.

::

    pending: … tiny tiny tiny HEAVY tiny tiny unknown …
             └──── run A ────┘└ B ┘└─ run C ─┘└─ D ─┘   (cut by what each call is expected to cost)
    run answered after `elapsed` s ─▶ CostTable.learn(run's mix, elapsed) ─▶ cost per (module, function)

A run is a stretch of consecutive requests sent to one worker in one link
message. Long runs amortise the IPC of tiny calls; a heavy call must go alone,
to an idle worker, or the calls behind it wait and the pool's cores idle.

* :class:`CostTable` keeps a smoothed seconds-per-call for each
  ``(module, function)`` (``None`` is the key of requests that name no
  function, e.g. ``protocol: bare``). A function never measured is *unknown*
  and treated as heavy: it goes alone to an idle worker, so a cold pool
  spreads its first burst from the first call, and a cheap function learns
  that it is cheap from its first run or two. The table holds at most
  ``MAX_FUNCTIONS`` names; the least recently measured is forgotten first (it
  becomes unknown again and re-learns in one run), so requests naming many
  functions cannot grow memory.
* :func:`cut` says where a run starts and ends. A *heavy* call (unknown, or
  ``PIPELINE_COST_S`` or more) is a run of its own, for an idle worker only:
  it never waits behind other calls, nor they behind it. *Cheap* calls share
  a run while their expected costs add up to at most ``RUN_TARGET_S``, and
  only they are queued to a busy worker (pipelining).
* Cheap work is kept on as few workers as keep up with it. A run is not cut
  at a worker's even share of the queue before it holds ``SHARE_MIN_S`` of
  expected work, and a busy worker expected to be done within ``SHARE_MIN_S``
  (:meth:`CostTable.expected`) is sent the next cheap run before an idle one
  is woken. Waking a worker for a few microseconds of work costs more than
  it saves: on a machine with few cores the extra process spinning and
  waking takes the CPU the busy ones need (on 2 cores, 50 lock-step callers
  of a tiny function: 49,000–58,000 calls/s before, 66,000–75,000 after, in
  alternating benchmark runs; see ``benchmarks/README.md``).
* Attribution: a run's measured time is shared among its functions in
  proportion to what each was expected to cost when it was cut (``count ×
  estimate``); a run of one function gives ``elapsed / count`` exactly. Only
  functions already known to be cheap share a run, so a mixed run corrects
  their estimates together, and any run of a function alone measures it.
  Each call of a run counts as one smoothing step (a run of 20 calls weighs
  almost fully); a lone call faster than its function's estimate is believed
  at once, because what else a lone call measures (wake-ups) only ever adds.
  The price: a function whose cost depends on its arguments is known by its
  recent calls; after a cheap one, its next run may hold several expensive
  calls (as many as ``RUN_TARGET_S`` of the cheap estimate allows), and that
  run's measurement makes it heavy again.
* Speed: a stretch of calls of one function is found by counting its head
  bytes in the stretch (one C scan); only if the count differs from the
  number of calls is each call's start compared. A call whose arguments hold
  those bytes while another call in the stretch is of another function can
  fool the count: that call then rides in the run. That changes only where
  a call runs, never its reply or its order.
"""

from __future__ import annotations

import math
from itertools import repeat
from operator import add
from typing import Union

from poolport.codec import peek
from poolport.protocol.bert import request_name

Key = Union[tuple[str, str], None]  # (module, function); None: a request naming no function
Mix = list[tuple[Key, int, float]]  # what a run holds: (function, calls, expected seconds per call)

RUN_TARGET_S = 0.002  # aim for runs of about this much work: long enough to amortise IPC
PIPELINE_COST_S = 0.001  # a run is queued to a busy worker only if every call in it is cheaper
SHARE_MIN_S = 0.001  # less work than this is not worth another worker (its wake-up costs more)
SMOOTHING = 0.2  # weight of one call's newest measurement in its function's average
MAX_FUNCTIONS = 1024  # functions whose cost is remembered; the least recently measured goes first
MAX_PREFIXES = 4096  # request heads remembered by NameReader (cleared when full)


class CostTable:
    """Smoothed seconds per call for each function, at most ``limit`` of them."""

    __slots__ = ("_costs", "limit")

    def __init__(self, limit: int = MAX_FUNCTIONS) -> None:
        self._costs: dict[Key, float] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._costs)

    def cost(self, key: Key) -> float | None:
        """Expected seconds per call; ``None`` if the function was never measured (or forgotten)."""
        return self._costs.get(key)

    def expected(self, mix: Mix | None) -> float:
        """Seconds the calls of ``mix`` are expected to take now; infinite if one of them is not
        known to be cheap (unknown, or ``PIPELINE_COST_S`` or more): no estimate of it is trusted."""
        if not mix:
            return math.inf
        total = 0.0
        for key, count, _ in mix:
            price = self._costs.get(key)
            if price is None or price >= PIPELINE_COST_S:
                return math.inf
            total += count * price
        return total

    def calls_in(self, key: Key, seconds: float) -> int:
        """How many calls of ``key`` are expected to take ``seconds`` (1 if unknown or heavier)."""
        price = self._costs.get(key)
        if not price or price >= seconds:
            return 1
        return math.ceil(seconds / price)

    def learn(self, mix: Mix, elapsed: float) -> None:
        """A run holding ``mix`` took ``elapsed`` seconds from send to its last reply."""
        if not mix or elapsed < 0:
            return
        if len(mix) == 1:
            key, count, _ = mix[0]
            self._update(key, elapsed / max(1, count), count, lone=count == 1)
            return
        calls = sum(count for _, count, _ in mix)
        expected = sum(count * guess for _, count, guess in mix)
        counts: dict[Key, int] = {}  # one update per function, however many stretches it had
        guesses: dict[Key, float] = {}
        for key, count, guess in mix:
            counts[key] = counts.get(key, 0) + count
            guesses[key] = guess
        for key, count in counts.items():
            guess = guesses[key]
            self._update(key, guess * elapsed / expected if expected > 0 else elapsed / calls, count)

    def _update(self, key: Key, per_call: float, calls: int, lone: bool = False) -> None:
        """Smoothed as if each of the ``calls`` measured ``per_call``: a run of many calls
        weighs more than a lone call (a cheap function learns in a run or two).

        A ``lone`` call's time is mostly waiting when the call is tiny (the worker's and the
        dispatcher's wake-ups: milliseconds on busy cores), and waiting only ever adds: so a
        lone call faster than the estimate is believed at once, or a tiny function could
        stay "heavy" (alone, never batched) for as long as the cores stay busy."""
        costs = self._costs
        old = costs.pop(key, None)  # re-inserted last: the dict's order is the order of measurement
        if old is None and len(costs) >= self.limit:
            del costs[next(iter(costs))]  # forget the least recently measured
        if old is None or (lone and per_call < old):
            costs[key] = per_call
        else:
            weight = 1 - (1 - SMOOTHING) ** max(1, calls)
            costs[key] = weight * per_call + (1 - weight) * old


class NameReader:
    """The function each request item calls, read from its head bytes.

    ``{call|cast, M, F, Args}`` terms of the same function start with the same
    bytes up to ``F``; those heads are remembered (at most ``MAX_PREFIXES``), so
    a name is parsed once per function, not once per call. Anything else
    (``{info, …}`` first, compressed, not a call) is read by
    :func:`poolport.protocol.bert.request_name`.
    """

    __slots__ = ("packet", "bare", "_names")

    def __init__(self, packet: int, bare: bool = False) -> None:
        self.packet = packet
        self.bare = bare  # protocol: bare: no request names a function (one shared estimate)
        self._names: dict[bytes, Key] = {}

    def head(self, data: bytes, begin: int, stop: int) -> bytes | None:
        """The bytes of the item's term up to its function's name, if it is a plain call."""
        s = begin + self.packet
        pos = peek.request_head_end(data, s, stop)
        return data[s:pos] if pos else None

    def __call__(self, data: bytes, begin: int, stop: int) -> Key:
        if self.bare:
            return None
        head = self.head(data, begin, stop)
        if head is None:
            return request_name(data, self.packet, begin, stop)
        try:
            return self._names[head]
        except KeyError:
            pass
        if len(self._names) >= MAX_PREFIXES:
            self._names.clear()
        name = self._names[head] = request_name(data, self.packet, begin, stop)
        return name


def cut(
    table: CostTable,
    name_of: NameReader,
    data: bytes,
    bounds: list[int],
    i: int,
    j: int,
    busy: bool = False,
    share: int | None = None,
) -> tuple[int, Mix]:
    """Where the run of items ``i .. j - 1`` should end (``Ledger.take_run``'s ``cut``), and its mix.

    Returns ``i`` (no run) only for a ``busy`` worker whose first call is not known to be
    cheap; otherwise at least one item. A heavy or unknown call goes alone; cheap calls are
    added while their expected costs sum to at most ``RUN_TARGET_S``. With ``share`` (a
    worker's even share of the queue) the run ends once it holds that many calls and at
    least ``SHARE_MIN_S`` of expected work."""
    packet = name_of.packet
    mix: Mix = []
    total = 0.0
    k = i
    stop = j if share is None else min(j, i + share)  # ... once SHARE_MIN_S of work is reached
    while k < j:
        if k >= stop and total >= SHARE_MIN_S:
            break
        key = name_of(data, bounds[k], bounds[k + 1])
        price = table.cost(key)
        if price is None or price >= PIPELINE_COST_S:
            if k == i and not busy:
                return i + 1, [(key, 1, price or 0.0)]  # unknown or heavy: a run of its own
            break
        if k > i and total + price > RUN_TARGET_S:
            break
        start = k
        k += 1
        # the calls after it with the same head bytes call the same function: compared, not parsed
        more = (RUN_TARGET_S - total - price) / price if price > 0 else math.inf  # calls that still fit
        end = j if more >= j - k else k + max(0, int(more))
        if end > stop and price > 0:  # past the share: only the calls still wanted for SHARE_MIN_S
            wanted = (SHARE_MIN_S - total - price) / price
            if wanted < end - k:
                end = max(stop, k + max(0, math.ceil(wanted)))
        head = None if name_of.bare else name_of.head(data, bounds[start], bounds[k])
        if head is not None and k < end:
            if data.count(head, bounds[k] + packet, bounds[end]) == end - k:
                k = end  # as many heads as calls: taken as one per call (see the module's notes)
            else:  # which call differs: startswith(head, its start, its end), in one C loop
                starts = map(add, bounds[k:end], repeat(packet))
                same = list(map(data.startswith, repeat(head), starts, bounds[k + 1 : end + 1]))
                k = end if all(same) else k + same.index(False)
        elif name_of.bare:
            k = end  # every bare request is the same "function"
        total += price * (k - start)
        if mix and mix[-1][0] == key:  # the same function under another head (call and cast)
            mix[-1] = (key, mix[-1][1] + k - start, price)
        else:
            mix.append((key, k - start, price))
    return k, mix
