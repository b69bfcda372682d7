"""The benchmark's reference: the single-process port a user would otherwise write.

``python -m poolport.tools.bench_reference`` serves BERT-RPC over ``{packet, 4}`` on
stdin/stdout in ONE process, the 2017 seed's architecture (read a frame,
decode, call, encode, write; all in one loop), written as well as such a loop
can be in modern Python so that it is a strong baseline:

* stdin is read in chunks of up to 64 KiB (a bigger request costs CPython a
  big allocation per read), and every complete frame
  in a chunk is served before the next read; a big frame is read straight
  into a buffer of its exact size (no repeated concatenation);
* the replies of one chunk are written with one ``os.writev`` call;
* its own minimal ETF codec, independent of ``poolport.codec.etf``, covering what the
  benchmark sends and receives (integers, floats, atoms, tuples, lists,
  charlists, binaries, maps), with the hot paths inline;
* module/function lookups are cached.

It calls the same handlers as poolport (``poolport.demo_handlers``): a request
``{call, M, F, Args}`` is answered ``{reply, M:F(Args...)}``. The benchmark's
Erlang driver starts by asking ``{call, '$poolport', info, []}``; this server
answers ``#{workers => 1}`` so the same driver warms both up. A handler
exception is answered ``{error, {user, 0, Class, Detail, []}}``. It is not a
product: no allowlist, limits or timeouts (only the benchmark uses it).
"""

from __future__ import annotations

import importlib
import os
import struct
import sys
from typing import Any

__all__ = ["Atom", "decode", "encode", "serve", "main"]


class Atom(str):
    """An Erlang atom (a ``str`` subclass, so handlers can compare it to text)."""

    __slots__ = ()


# ----------------------------------------------------------------- decoding

_F64 = struct.Struct(">d")
_atoms: dict[bytes, Any] = {b"true": True, b"false": False, b"undefined": None}


def _dec(d: bytes, i: int) -> tuple[Any, int]:
    """Decode the term at ``d[i]``; returns (term, next position). Commonest tags first."""
    t = d[i]
    if t == 97:  # SMALL_INTEGER_EXT
        return d[i + 1], i + 2
    if t == 104:  # SMALL_TUPLE_EXT
        items, i = _items(d, i + 2, d[i + 1])
        return tuple(items), i
    if t == 100 or t == 118:  # ATOM_EXT (what OTP 25 writes) / ATOM_UTF8_EXT
        j = i + 3 + int.from_bytes(d[i + 1 : i + 3], "big")
        raw = d[i + 3 : j]
        a = _atoms.get(raw)
        if a is None and raw not in _atoms:
            a = _atoms[raw] = Atom(raw.decode("utf-8"))
        return a, j
    if t == 119 or t == 115:  # SMALL_ATOM_UTF8_EXT (OTP 26+) / SMALL_ATOM_EXT
        j = i + 2 + d[i + 1]
        raw = d[i + 2 : j]
        a = _atoms.get(raw)
        if a is None and raw not in _atoms:
            a = _atoms[raw] = Atom(raw.decode("utf-8"))
        return a, j
    if t == 109:  # BINARY_EXT
        j = i + 5 + int.from_bytes(d[i + 1 : i + 5], "big")
        return d[i + 5 : j], j
    if t == 108:  # LIST_EXT
        items, i = _items(d, i + 5, int.from_bytes(d[i + 1 : i + 5], "big"))
        if d[i] == 106:  # proper list
            return items, i + 1
        raise ValueError("improper lists are not supported by the reference")
    if t == 106:  # NIL_EXT
        return [], i + 1
    if t == 98:  # INTEGER_EXT
        return int.from_bytes(d[i + 1 : i + 5], "big", signed=True), i + 5
    if t == 116:  # MAP_EXT
        n = int.from_bytes(d[i + 1 : i + 5], "big")
        i += 5
        m = {}
        for _ in range(n):
            k, i = _dec(d, i)
            v, i = _dec(d, i)
            m[k] = v
        return m, i
    if t == 70:  # NEW_FLOAT_EXT
        return _F64.unpack_from(d, i + 1)[0], i + 9
    if t == 107:  # STRING_EXT (a charlist)
        j = i + 3 + int.from_bytes(d[i + 1 : i + 3], "big")
        return list(d[i + 3 : j]), j
    if t == 110 or t == 111:  # SMALL_BIG_EXT / LARGE_BIG_EXT
        if t == 110:
            n, sign, i = d[i + 1], d[i + 2], i + 3
        else:
            n, sign, i = int.from_bytes(d[i + 1 : i + 5], "big"), d[i + 5], i + 6
        v = int.from_bytes(d[i : i + n], "little")
        return (-v if sign else v), i + n
    if t == 105:  # LARGE_TUPLE_EXT
        items, i = _items(d, i + 5, int.from_bytes(d[i + 1 : i + 5], "big"))
        return tuple(items), i
    raise ValueError(f"unsupported ETF tag {t} at byte {i}")


def _items(d: bytes, i: int, n: int) -> tuple[list[Any], int]:
    """The ``n`` terms from ``i`` on (elements of a tuple or list)."""
    items = []
    for _ in range(n):
        x, i = _dec(d, i)
        items.append(x)
    return items, i


def decode(data: bytes, start: int = 0) -> Any:
    """Decode one term (version byte 131 at ``data[start]``)."""
    if data[start] != 131:
        raise ValueError("bad version byte")
    return _dec(data, start + 1)[0]


# ----------------------------------------------------------------- encoding

_SMALL = [bytes((97, i)) for i in range(256)]
_TUP = [bytes((104, i)) for i in range(256)]
_atom_bytes: dict[str, bytes] = {}


def _enc_atom(name: str) -> bytes:
    b = _atom_bytes.get(name)
    if b is None:
        raw = name.encode("utf-8")
        b = _atom_bytes[name] = bytes((119, len(raw))) + raw
    return b


def _enc(x: Any, out: list[bytes]) -> None:
    tx = type(x)
    if tx is int:
        if 0 <= x < 256:
            out.append(_SMALL[x])
        elif -2147483648 <= x <= 2147483647:
            out.append(b"b" + x.to_bytes(4, "big", signed=True))
        else:
            mag = -x if x < 0 else x
            raw = mag.to_bytes((mag.bit_length() + 7) // 8, "little")
            if len(raw) < 256:
                out.append(bytes((110, len(raw), x < 0)) + raw)
            else:
                out.append(b"o" + len(raw).to_bytes(4, "big") + bytes((x < 0,)) + raw)
    elif tx is bytes or tx is bytearray:
        out.append(b"m" + len(x).to_bytes(4, "big"))
        out.append(x)
    elif tx is tuple:
        n = len(x)
        out.append(_TUP[n] if n < 256 else b"i" + n.to_bytes(4, "big"))
        for y in x:
            _enc(y, out)
    elif tx is Atom:
        out.append(_enc_atom(x))
    elif tx is list:
        if not x:
            out.append(b"j")
            return
        out.append(b"l" + len(x).to_bytes(4, "big"))
        for y in x:
            _enc(y, out)
        out.append(b"j")
    elif tx is dict:
        out.append(b"t" + len(x).to_bytes(4, "big"))
        for k, v in x.items():
            _enc(k, out)
            _enc(v, out)
    elif tx is float:
        out.append(b"F" + _F64.pack(x))
    elif x is True:
        out.append(b"w\x04true")
    elif x is False:
        out.append(b"w\x05false")
    elif x is None:
        out.append(b"w\x09undefined")
    elif tx is str:
        raw = x.encode("utf-8")
        out.append(b"m" + len(raw).to_bytes(4, "big"))
        out.append(raw)
    else:
        raise TypeError(f"cannot encode {tx.__name__}")


def encode(x: Any) -> bytes:
    out = [b"\x83"]
    _enc(x, out)
    return b"".join(out)


# ----------------------------------------------------------------- serving

_REPLY = b"\x83h\x02w\x05reply"  # {reply, _} up to the result
_functions: dict[tuple[str, str], Any] = {}


def _info() -> dict[Any, Any]:
    return {Atom("workers"): 1, Atom("os_pid"): os.getpid()}


def _function(mod: str, fun: str) -> Any:
    f = _functions.get((mod, fun))
    if f is None:
        f = _info if mod == "$poolport" else getattr(importlib.import_module(mod), fun)
        _functions[(mod, fun)] = f
    return f


def handle(data: bytes, start: int) -> bytes:
    """Serve one request frame starting at ``data[start]``; returns the reply (unframed)."""
    try:
        req = decode(data, start)
        if type(req) is not tuple or len(req) != 4 or req[0] != "call":
            raise ValueError("not a {call, M, F, A} request")
        result = _function(req[1], req[2])(*req[3])
        out = [_REPLY]
        _enc(result, out)
        body = b"".join(out)
    except Exception as exc:  # noqa: BLE001 - the reply carries it
        body = encode((Atom("error"), (Atom("user"), 0, type(exc).__name__, str(exc), [])))
    return body


def _write_all(fd: int, parts: list[bytes]) -> None:
    total = 0
    for p in parts:
        total += len(p)
    if len(parts) > 2:  # many small replies: one buffer, one write
        parts = [b"".join(parts)]
    done = os.writev(fd, parts)
    if done == total:
        return
    rest = memoryview(b"".join(parts))[done:]
    while rest:
        rest = rest[os.write(fd, rest) :]


def serve(rfd: int = 0, wfd: int = 1) -> None:
    pending = b""
    while True:
        chunk = os.read(rfd, 1 << 16)  # 64 KiB: asking for more costs a big allocation per read
        if not chunk:
            return
        data = pending + chunk if pending else chunk
        n = len(data)
        pos = 0
        out: list[bytes] = []
        while n - pos >= 4:
            end = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
            if end > n:
                break
            reply = handle(data, pos + 4)
            out.append(len(reply).to_bytes(4, "big"))
            out.append(reply)
            pos = end
        if out:
            _write_all(wfd, out)
        pending = data[pos:] if pos < n else b""
        if len(pending) >= 4:
            size = int.from_bytes(pending[:4], "big")
            if size - len(pending) > 65536:
                # A big frame: read the rest straight into a buffer of its size
                # (no pending + chunk concatenations).
                buf = bytearray(size)
                have = len(pending) - 4
                buf[:have] = pending[4:]
                view = memoryview(buf)
                while have < size:
                    got = os.readv(rfd, [view[have:]])
                    if not got:
                        return
                    have += got
                view.release()
                reply = handle(bytes(buf), 0)
                _write_all(wfd, [len(reply).to_bytes(4, "big"), reply])
                pending = b""


def main() -> int:
    # Handlers' print() must not corrupt the reply stream.
    rfd, wfd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        serve(rfd, wfd)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
