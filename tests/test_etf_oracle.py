"""Oracle test: a real Erlang/OTP node is the judge of what poolport.codec.etf reads and writes.

1. An escript builds thousands of seeded random terms (bignums, floats, UTF-8 atoms,
   binaries, bitstrings, improper lists, maps with complex keys, pids, refs, ports,
   funs, long strings, large tuples) and writes their ``term_to_binary`` blobs, some
   compressed, some with ``minor_version`` 0 (old floats) or 2 (UTF-8 atoms).
2. Python decodes every blob and encodes it again (some compressed).
3. Erlang checks ``binary_to_term(Re) =:= binary_to_term(Original)`` for each one.
4. Byte-exactness: for every blob, Erlang writes ``term_to_binary(binary_to_term(B))``
   (OTP 25: ATOM_EXT for Latin-1 atoms) and the same with ``[{minor_version, 2}]``
   (UTF-8 atoms, OTP 26+'s default); ``encode(decode(B))`` must equal the first with
   ``atom_encoding="latin1"`` and the second with ``"utf8"``, byte for byte.
5. The other way round: seeded random Python terms go to Erlang (in both atom
   encodings), which decodes and re-encodes them; Python must get back equal terms.

Erlang is required (CI installs it): without ``erl`` on PATH this test fails.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from poolport.codec.etf import decode, encode
from poolport.codec.terms import Atom, BitString, ImproperList, MapKey, Opaque

pytestmark = [pytest.mark.slow]

SEED = 20240611  # change to explore; printed on every run
RANDOM_TERMS = 2500  # plus the fixed edge cases in the escript
MIN_CHECKED = 2000
TIMEOUT = 300  # seconds per erl run; only there to catch a hang

ORACLE_ESCRIPT = r"""
#!/usr/bin/env escript
%% poolport ETF oracle: gen <Seed> <Count> <Out> | check <Orig> <Re> | echo <In> <Out>
%%                      | canon <In> <Latin1Out> <Utf8Out>
-mode(compile).

main(["gen", Seed, Count, Out]) ->
    gen(list_to_integer(Seed), list_to_integer(Count), Out);
main(["check", Orig, Re]) ->
    check(read_blobs(Orig), read_blobs(Re));
main(["echo", In, Out]) ->
    write_blobs(Out, [term_to_binary(binary_to_term(B)) || B <- read_blobs(In)]),
    io:format("echoed~n");
main(["canon", In, Latin1, Utf8]) ->
    Terms = [binary_to_term(B) || B <- read_blobs(In)],
    write_blobs(Latin1, [term_to_binary(T) || T <- Terms]),
    write_blobs(Utf8, [term_to_binary(T, [{minor_version, 2}]) || T <- Terms]),
    io:format("canon ~s~n", [erlang:system_info(otp_release)]).

gen(Seed, Count, Out) ->
    rand:seed(exsss, {Seed, Seed + 1, Seed + 2}),
    io:format("seed ~p~n", [Seed]),
    Port = hd(erlang:ports()),
    Terms = fixed(Port) ++ [term(4, Port) || _ <- lists:seq(1, Count)],
    Numbered = lists:zip(lists:seq(1, length(Terms)), Terms),
    write_blobs(Out, [to_binary(I, T) || {I, T} <- Numbered]),
    io:format("generated ~p~n", [length(Terms)]).

to_binary(I, T) ->
    case I rem 10 of
        0 -> term_to_binary(T, [compressed]);
        1 -> term_to_binary(T, [{minor_version, 0}]);
        2 -> term_to_binary(T, [{minor_version, 2}]);
        3 -> term_to_binary(T, [{compressed, 9}, {minor_version, 2}]);
        _ -> term_to_binary(T)
    end.

check(Origs, Res) when length(Origs) =/= length(Res) ->
    io:format("count mismatch ~p ~p~n", [length(Origs), length(Res)]);
check(Origs, Res) ->
    Pairs = lists:zip(lists:seq(1, length(Origs)), lists:zip(Origs, Res)),
    Bad = [{I, O, R} || {I, {O, R}} <- Pairs, not same(O, R)],
    [io:format("mismatch ~p:~n  original ~tP~n  python   ~tP~n",
               [I, binary_to_term(O), 30, safe(R), 30]) || {I, O, R} <- lists:sublist(Bad, 5)],
    io:format("checked ~p mismatches ~p~n", [length(Origs), length(Bad)]).

same(O, R) -> try binary_to_term(R) =:= binary_to_term(O) catch _:_ -> false end.
safe(R) -> try binary_to_term(R) catch C:E -> {C, E, R} end.

read_blobs(File) -> {ok, Data} = file:read_file(File), split(Data).
split(<<>>) -> [];
split(<<N:32, B:N/binary, Rest/binary>>) -> [B | split(Rest)].
write_blobs(File, Blobs) -> ok = file:write_file(File, [[<<(byte_size(B)):32>>, B] || B <- Blobs]).

fixed(Port) ->
    N = length(atom_to_list(node())),
    Env = {self(), make_ref(), #{k => [N]}},
    [#{1 => a, 1.0 => b}, #{true => x, 1 => y, 1.0 => z},
     #{[1, 2] => a, #{k => v} => b, {1, [x]} => c, [] => d, {1.5} => e, {1} => f},
     #{#{[] => []} => #{[1] => [2]}},
     lists:seq(1, 70000), lists:duplicate(65535, 7), lists:duplicate(65536, 7),
     list_to_tuple(lists:seq(1, 300)), list_to_tuple([]),
     binary:copy(<<"0123456789abcdef">>, 65536), <<1:1>>, <<255, 7:7>>,
     [1 | 2], [a, b | <<"t">>], [[] | []], "abc" ++ [256],
     1 bsl 100000, -(1 bsl 2040), 1 bsl 2040 - 1, -(1 bsl 2039), 16#7fffffff, -16#80000000,
     16#80000000, -16#80000001, 0.0, -1.5, 5.0e-324, 1.7976931348623157e308,
     2.2250738585072014e-308, 'hé', '日本語', list_to_atom(lists:duplicate(255, 16#65E5)),
     list_to_atom(lists:duplicate(255, $é)), '', undefined, nil, true, false,
     self(), make_ref(), Port, fun lists:map/2, fun erlang:self/0,
     fun(X) -> {X, Env} end, fun() -> ok end,
     {self(), [make_ref(), Port], #{self() => fun lists:map/2}},
     lists:foldl(fun(_, Acc) -> [Acc] end, x, lists:seq(1, 300))].

term(0, P) -> leaf(P);
term(D, P) ->
    case rand:uniform(13) of
        N when N =< 5 -> leaf(P);
        6 -> [term(D - 1, P) || _ <- count(6)];
        7 -> list_to_tuple([term(D - 1, P) || _ <- count(6)]);
        8 -> maps:from_list([{term(D - 1, P), term(D - 1, P)} || _ <- count(6)]);
        9 -> maps:from_list([{atom(), term(D - 1, P)} || _ <- count(8)]);
        10 -> lists:foldr(fun(X, Acc) -> [X | Acc] end, tail(P), [term(D - 1, P) || _ <- count(3)]);
        11 -> [rand:uniform(256) - 1 || _ <- count(300)];
        12 -> list_to_tuple([leaf(P) || _ <- lists:seq(1, 256 + rand:uniform(20))]);
        13 -> V = term(D - 1, P), fun(X) -> {X, V} end
    end.

count(Max) -> lists:seq(1, rand:uniform(Max + 1) - 1).

tail(P) ->
    case leaf(P) of
        L when is_list(L) -> {L};
        T -> T
    end.

leaf(P) ->
    case rand:uniform(24) of
        1 -> rand:uniform(256) - 1;
        2 -> -rand:uniform(1 bsl 31);
        3 -> rand:uniform(1 bsl 31) - 1;
        4 -> sign() * (rand:uniform(1 bsl 64) bsl rand:uniform(2200));
        5 -> sign() * rand:uniform(1 bsl 40);
        6 -> (rand:uniform() - 0.5) * math:pow(10, rand:uniform(600) - 300);
        7 -> lists:nth(rand:uniform(6), [0.0, 1.0, -2.5, 5.0e-324, 1.0e300, 123456.789]);
        8 -> atom();
        9 -> atom();
        10 -> rand:bytes(rand:uniform(40) - 1);
        11 -> Bits = rand:uniform(7), <<(rand:bytes(rand:uniform(5) - 1))/binary, (rand:uniform(1 bsl Bits) - 1):Bits>>;
        12 -> self();
        13 -> make_ref();
        14 -> P;
        15 -> fun lists:map/2;
        16 -> fun(X) -> X end;
        17 -> lists:nth(rand:uniform(4), [true, false, undefined, nil]);
        18 -> [];
        19 -> <<>>;
        20 -> unicode:characters_to_binary([rand:uniform(16#2000) || _ <- count(10)]);
        21 -> lists:nth(rand:uniform(8), [255, 256, -1, 16#7fffffff, -16#80000000, 16#80000000,
                                         1 bsl 2040, -(1 bsl 2040) + 1]);
        22 -> "text";
        23 -> {};
        24 -> rand:uniform() * 1000
    end.

sign() -> lists:nth(rand:uniform(2), [1, -1]).

atom() ->
    Chars = "abcxyz_@09" ++ [16#E9, 16#FC, 16#DF, 16#65E5, 16#672C, 16#1F600, $\s],
    Len = case rand:uniform(20) of 1 -> 255; _ -> rand:uniform(12) - 1 end,
    list_to_atom([lists:nth(rand:uniform(length(Chars)), Chars) || _ <- lists:seq(1, Len)]).
"""


def _write_blobs(path: Path, blobs: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack(">I", len(b)) + b for b in blobs))


def _read_blobs(path: Path) -> list[bytes]:
    data = path.read_bytes()
    blobs, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        blobs.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return blobs


def _escript(script: Path, *args: object) -> str:
    escript = shutil.which("escript")
    assert escript, "escript not on PATH (it ships with Erlang/OTP)"
    done = subprocess.run(
        [escript, str(script), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"escript {args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _holds_opaque(term: Any) -> bool:
    """Pids, ports, refs and funs keep the bytes they came with (their node atom's tag too),
    so only terms without them are written exactly as Erlang would write them now."""
    if isinstance(term, Opaque):
        return True
    if isinstance(term, dict):
        return any(_holds_opaque(k) or _holds_opaque(v) for k, v in term.items())
    if isinstance(term, MapKey):
        return _holds_opaque(term.term)
    if isinstance(term, ImproperList):
        return _holds_opaque(term.items) or _holds_opaque(term.tail)
    return isinstance(term, (list, tuple)) and any(map(_holds_opaque, term))


def _random_term(rng: random.Random, depth: int) -> Any:
    """A random Python term in the decoder's image (Erlang will echo it back)."""
    kind = rng.randrange(16 if depth else 10)
    if kind == 0:
        return rng.randrange(-(2**40), 2**40)
    if kind == 1:
        return rng.getrandbits(rng.randrange(1, 2500)) * rng.choice((1, -1))
    if kind == 2:
        return rng.uniform(-1e6, 1e6) * 10.0 ** rng.randrange(-300, 300)
    if kind == 3:
        length = rng.choice((0, 1, 5, 30, 255))
        return Atom("".join(rng.choice("abz_éü日本😀 ") for _ in range(length)))
    if kind == 4:
        return rng.randbytes(rng.randrange(40))
    if kind == 5:
        bits = rng.randrange(1, 8)
        data = bytearray(rng.randbytes(rng.randrange(1, 6)))
        data[-1] &= (0xFF << (8 - bits)) & 0xFF
        return BitString(bytes(data), bits)
    if kind == 6:
        return rng.choice((True, False, None, [], (), b"", 0, 255, 256, -1, 2**31, -(2**31)))
    if kind == 7:
        return [rng.randrange(256) for _ in range(rng.randrange(1, 200))]
    if kind == 8:
        return rng.random()
    if kind == 9:
        return Atom("x")
    children = [_random_term(rng, depth - 1) for _ in range(rng.randrange(6))]
    if kind == 10:
        return children
    if kind == 11:
        return tuple(children)
    if kind == 12:
        return {Atom(f"k{i}"): child for i, child in enumerate(children)}
    if kind == 13:
        return {MapKey(children): 1, MapKey({1: children}): 2, 1: 3, 2.5: 4, (1, Atom("a")): 5}
    if kind == 14:
        tail = _random_term(rng, 0)
        if isinstance(tail, list):
            tail = (tail,)
        return ImproperList(children or [1], tail)
    return tuple(range(rng.randrange(250, 300)))


def test_erlang_agrees_with_the_codec(tmp_path: Path) -> None:
    if shutil.which("erl") is None:
        pytest.fail("erl is not on PATH: install Erlang/OTP (apt-get install erlang-nox)")
    print(f"oracle seed {SEED}")
    script = tmp_path / "etf_oracle.escript"
    script.write_text(ORACLE_ESCRIPT.lstrip())

    # Erlang -> Python -> Erlang
    original, reencoded = tmp_path / "original.bin", tmp_path / "reencoded.bin"
    out = _escript(script, "gen", SEED, RANDOM_TERMS, original)
    assert f"seed {SEED}" in out
    blobs = _read_blobs(original)
    assert len(blobs) >= MIN_CHECKED
    again = [encode(decode(b), compressed=6 if i % 7 == 0 else 0) for i, b in enumerate(blobs)]
    _write_blobs(reencoded, again)
    report = _escript(script, "check", original, reencoded)
    assert f"checked {len(blobs)} mismatches 0" in report, report

    # byte for byte what term_to_binary writes, in each atom encoding
    latin1, utf8 = tmp_path / "latin1.bin", tmp_path / "utf8.bin"
    release = _escript(script, "canon", original, latin1, utf8).split()[-1]
    for path, atom_encoding in ((latin1, "latin1"), (utf8, "utf8")):
        if atom_encoding == "latin1" and int(release) >= 26:
            continue  # OTP 26+ writes UTF-8 atoms by default: only the utf8 setting matches it
        expected = _read_blobs(path)
        assert len(expected) == len(blobs)
        plain = [(b, e) for b, e in zip(blobs, expected) if not _holds_opaque(decode(b))]
        assert len(plain) >= MIN_CHECKED // 2
        differ = [i for i, (b, e) in enumerate(plain) if encode(decode(b), atom_encoding=atom_encoding) != e]
        assert not differ, (
            f"{len(differ)} terms are not written as OTP {release} writes them ({atom_encoding}), "
            f"first: {decode(plain[differ[0]][0])!r}"
        )

    # Python -> Erlang -> Python
    rng = random.Random(SEED)
    terms = [_random_term(rng, 3) for _ in range(1000)]
    sent, echoed = tmp_path / "python.bin", tmp_path / "echoed.bin"
    _write_blobs(
        sent,
        [
            encode(t, compressed=6 if i % 5 == 0 else 0, atom_encoding="utf8" if i % 2 else "latin1")
            for i, t in enumerate(terms)
        ],
    )
    _escript(script, "echo", sent, echoed)
    back = [decode(b) for b in _read_blobs(echoed)]
    assert len(back) == len(terms)
    wrong = [i for i, (t, b) in enumerate(zip(terms, back)) if t != b]
    assert not wrong, f"{len(wrong)} terms changed on the way through Erlang, first: {terms[wrong[0]]!r}"
