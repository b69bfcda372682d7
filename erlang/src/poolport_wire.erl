%% @doc The wire protocol between a pool and `python -m poolport serve',
%% as pure functions: the frames a pool writes (calls, casts, the timeout
%% info packet) and how it reads a tagged reply,
%% `<<Seq:64/big-unsigned, Etf/binary>>', against the head of its queue.
%% No process, no port: every function here is unit-tested on bytes.
-module(poolport_wire).

-export([encode_call/3]).
-export([encode_cast/3]).
-export([encode_timeout/1]).
-export([check_frame/2]).
-export([next_seq/1]).
-export([match_reply/2]).
-export([decode_reply/1]).
-export([call_result/1]).
-export([is_reply/1]).
-export([read_result/1]).

-type seq() :: 0..16#FFFFFFFFFFFFFFFF.
%% Number of a request on the current port, as in Python's reply tags.
-type misalignment() :: #{why := seq_mismatch | empty_queue | short_frame | bad_term | unknown_stream,
                          expected := seq() | none,
                          got := seq() | none}.
%% What was wrong with a reply frame: `expected' is the head entry's number
%% (`none' if no request was pending), `got' the frame's (`none' if it was
%% too short to carry one).
-type reply() :: {reply, term()} | noreply | {error, term()} | {bad_reply, term()}.

-export_type([seq/0, misalignment/0, reply/0]).

%% @doc Encode `{call, Module, Function, Args}'.
-spec encode_call(atom(), atom(), list()) -> binary().
encode_call(Module, Function, Args) ->
    term_to_binary({call, Module, Function, Args}).

%% @doc Encode `{cast, Module, Function, Args}'.
-spec encode_cast(atom(), atom(), list()) -> binary().
encode_cast(Module, Function, Args) ->
    term_to_binary({cast, Module, Function, Args}).

-spec check_frame(binary(), 1 | 2 | 4) -> ok | {error, poolport:bert_error()}.
check_frame(Frame, Packet) ->
    Size = byte_size(Frame),
    Max = (1 bsl (8 * Packet)) - 1,
    case Size =< Max of
        true ->
            ok;
        false ->
            Detail = iolist_to_binary(io_lib:format(
                "request of ~b bytes does not fit {packet, ~b} (at most ~b bytes)",
                [Size, Packet, Max])),
            {error, {protocol, 1, <<"FrameTooLarge">>, Detail, []}}
    end.

-spec next_seq(seq()) -> seq().
next_seq(Seq) ->
    (Seq + 1) band 16#FFFFFFFFFFFFFFFF.

%% `{info, timeout, [{ms, Ms}]}'; Python reads 0 as "no limit": that is
%% what `infinity' sends (to override `--caller-timeout-ms'), and a zero
%% timeout is sent as 1 ms.
-spec encode_timeout(timeout()) -> binary().
encode_timeout(infinity) ->
    term_to_binary({info, timeout, [{ms, 0}]});
encode_timeout(Ms) ->
    term_to_binary({info, timeout, [{ms, max(Ms, 1)}]}).

%% The ETF part of a reply frame; `undecodable' if it is no term at all.
%% A term of the wrong shape is still the answer to its request (the
%% caller gets a protocol error for it).
-spec decode_reply(binary()) -> reply() | undecodable.
decode_reply(Data) ->
    try binary_to_term(Data) of
        {reply, Result} -> {reply, Result};
        {noreply} -> noreply;
        {error, Error} -> {error, Error};
        Other -> {bad_reply, Other}
    catch
        error:badarg -> undecodable
    end.

%% Match a tagged reply frame, `<<Seq:64/big-unsigned, Etf/binary>>',
%% with the head of the queue: the head entry, the `Etf' part (not decoded
%% here) and the rest of the queue, or what makes it a misalignment.
-spec match_reply(binary(), queue:queue({seq(), Entry})) ->
          {ok, Entry, binary(), queue:queue({seq(), Entry})} | {misaligned, misalignment()}.
match_reply(<<Got:64/big-unsigned, Etf/binary>>, Queue) ->
    case queue:out(Queue) of
        {empty, _} ->
            {misaligned, #{why => empty_queue, expected => none, got => Got}};
        {{value, {Got, Entry}}, Rest} ->
            {ok, Entry, Etf, Rest};
        {{value, {Expected, _}}, _} ->
            {misaligned, #{why => seq_mismatch, expected => Expected, got => Got}}
    end;
match_reply(_Short, Queue) ->
    Expected = case queue:peek(Queue) of
                   {value, {Seq, _}} -> Seq;
                   empty -> none
               end,
    {misaligned, #{why => short_frame, expected => Expected, got => none}}.

%% Whether the ETF of a reply is `{reply, _}', from its first bytes alone:
%% the pool hands such a reply to its caller undecoded and the caller
%% decodes it ({@link read_result/1}), so the pool process never spends
%% time on a result's term. Every atom tag Python may write `reply' with is
%% recognised; anything else (an error, a compressed term) is decoded by
%% the pool itself.
-spec is_reply(binary()) -> boolean().
is_reply(<<131, 104, 2, 100, 0, 5, "reply", _/binary>>) -> true;  % ATOM_EXT
is_reply(<<131, 104, 2, 119, 5, "reply", _/binary>>) -> true;     % SMALL_ATOM_UTF8_EXT
is_reply(<<131, 104, 2, 118, 0, 5, "reply", _/binary>>) -> true;  % ATOM_UTF8_EXT
is_reply(<<131, 104, 2, 115, 5, "reply", _/binary>>) -> true;     % SMALL_ATOM_EXT
is_reply(_) -> false.

%% What a caller gets for the ETF of its reply (a protocol error if it is
%% not a term).
-spec read_result(binary()) -> {ok, term()} | {error, term()}.
read_result(Etf) ->
    call_result(decode_reply(Etf)).

%% What a caller gets for a reply.
-spec call_result(reply() | undecodable) -> {ok, term()} | {error, term()}.
call_result({reply, Result}) ->
    {ok, Result};
call_result({error, {server, 3, _Class, _Detail, _Trace}}) ->
    %% Python stopped the call at its timeout before we noticed ours.
    {error, timeout};
call_result({error, Error}) ->
    {error, Error};
call_result(noreply) ->
    {error, {protocol, 0, <<"UnexpectedReply">>, <<"{noreply} for a call">>, []}};
call_result(undecodable) ->
    {error, {protocol, 0, <<"UnexpectedReply">>, <<"a reply that is not a term">>, []}};
call_result({bad_reply, Term}) ->
    Detail = iolist_to_binary(io_lib:format("~0P", [Term, 20])),
    {error, {protocol, 0, <<"UnexpectedReply">>, Detail, []}}.

-ifdef(TEST).
-include_lib("eunit/include/eunit.hrl").

encode_test_() ->
    [?_assertEqual({call, m, f, [1, <<"a">>]}, binary_to_term(encode_call(m, f, [1, <<"a">>]))),
     ?_assertEqual({cast, m, f, []}, binary_to_term(encode_cast(m, f, []))),
     ?_assertEqual({info, timeout, [{ms, 250}]}, binary_to_term(encode_timeout(250))),
     ?_assertEqual({info, timeout, [{ms, 1}]}, binary_to_term(encode_timeout(0))),
     ?_assertEqual({info, timeout, [{ms, 0}]}, binary_to_term(encode_timeout(infinity)))].

decode_reply_test_() ->
    E = {user, 0, <<"ValueError">>, <<"bad">>, [<<"tb">>]},
    [?_assertEqual({reply, 42}, decode_reply(term_to_binary({reply, 42}))),
     ?_assertEqual(noreply, decode_reply(term_to_binary({noreply}))),
     ?_assertEqual({error, E}, decode_reply(term_to_binary({error, E}))),
     ?_assertEqual({bad_reply, {what}}, decode_reply(term_to_binary({what}))),
     ?_assertEqual(undecodable, decode_reply(<<1, 2, 3>>)),
     ?_assertEqual(undecodable, decode_reply(<<>>))].

%% A tagged reply frame: Seq, then the ETF of Term.
tagged(Seq, Term) ->
    <<Seq:64/big-unsigned, (term_to_binary(Term))/binary>>.

match_reply_test_() ->
    Q = queue:from_list([{7, sys_info}, {8, cast}]),
    {_, Rest} = queue:out(Q),
    X = term_to_binary({reply, x}),
    [{"the head's number: delivered, undecoded",
      ?_assertMatch({ok, sys_info, X, Rest}, match_reply(tagged(7, {reply, x}), Q))},
     {"a wrong shape is still the head's reply",
      ?_assertMatch({ok, sys_info, _, _}, match_reply(tagged(7, {what}), Q))},
     {"a later number (a reply was lost)",
      ?_assertEqual({misaligned, #{why => seq_mismatch, expected => 7, got => 8}},
                    match_reply(tagged(8, noreply), Q))},
     {"an earlier number (a reply was sent twice)",
      ?_assertEqual({misaligned, #{why => seq_mismatch, expected => 7, got => 6}},
                    match_reply(tagged(6, {reply, x}), Q))},
     {"the highest number",
      ?_assertEqual({misaligned, #{why => seq_mismatch, expected => 7,
                                   got => 16#FFFFFFFFFFFFFFFF}},
                    match_reply(tagged(16#FFFFFFFFFFFFFFFF, {reply, x}), Q))},
     {"no request pending",
      ?_assertEqual({misaligned, #{why => empty_queue, expected => none, got => 0}},
                    match_reply(tagged(0, {reply, x}), queue:new()))},
     {"shorter than a tag",
      ?_assertEqual({misaligned, #{why => short_frame, expected => 7, got => none}},
                    match_reply(<<0, 0, 0, 0, 0, 0, 7>>, Q))},
     {"empty frame, empty queue",
      ?_assertEqual({misaligned, #{why => short_frame, expected => none, got => none}},
                    match_reply(<<>>, queue:new()))},
     {"an untagged reply (Python without --reply-tags)",
      ?_assertMatch({misaligned, #{}}, match_reply(term_to_binary({reply, 42}), Q))},
     {"the right number, then no term: the head's (whoever decodes it finds out)",
      ?_assertMatch({ok, sys_info, <<1, 2, 3>>, Rest}, match_reply(<<7:64, 1, 2, 3>>, Q))},
     {"the right number, nothing after it",
      ?_assertMatch({ok, sys_info, <<>>, Rest}, match_reply(<<7:64>>, Q))}].

is_reply_test_() ->
    Big = binary:copy(<<"x">>, 1000),
    [?_assert(is_reply(term_to_binary({reply, 42}))),
     ?_assert(is_reply(term_to_binary({reply, Big}))),
     ?_assert(is_reply(term_to_binary({reply, [1, 2]}, [{minor_version, 2}]))),
     ?_assert(is_reply(<<131, 104, 2, 100, 0, 5, "reply", 97, 1>>)),
     ?_assert(is_reply(<<131, 104, 2, 118, 0, 5, "reply", 97, 1>>)),
     ?_assert(is_reply(<<131, 104, 2, 115, 5, "reply", 97, 1>>)),
     ?_assertNot(is_reply(term_to_binary({error, {user, 0, <<"E">>, <<>>, []}}))),
     ?_assertNot(is_reply(term_to_binary({noreply}))),
     ?_assertNot(is_reply(term_to_binary({reply, 1, 2}))),
     ?_assertNot(is_reply(term_to_binary({replies, 1}))),
     ?_assertNot(is_reply(term_to_binary({reply, Big}, [compressed]))),
     ?_assertNot(is_reply(<<131, 104, 2, 100, 0, 5, "repl">>)),
     ?_assertNot(is_reply(<<>>))].

read_result_test_() ->
    [?_assertEqual({ok, #{a => [1]}}, read_result(term_to_binary({reply, #{a => [1]}}))),
     ?_assertMatch({error, {protocol, 0, <<"UnexpectedReply">>, _, []}},
                   read_result(<<131, 104, 2, 100, 0, 5, "reply", 255>>)),
     ?_assertEqual({error, timeout},
                   read_result(term_to_binary({error, {server, 3, <<"Timeout">>, <<>>, []}})))].

next_seq_test_() ->
    [?_assertEqual(1, next_seq(0)),
     ?_assertEqual(0, next_seq(16#FFFFFFFFFFFFFFFF))].

call_result_test_() ->
    E = {user, 0, <<"ValueError">>, <<"bad">>, []},
    [?_assertEqual({ok, x}, call_result({reply, x})),
     ?_assertEqual({error, E}, call_result({error, E})),
     ?_assertEqual({error, timeout},
                   call_result({error, {server, 3, <<"Timeout">>, <<>>, []}})),
     ?_assertMatch({error, {protocol, 0, <<"UnexpectedReply">>, _, []}}, call_result(noreply)),
     ?_assertMatch({error, {protocol, 0, <<"UnexpectedReply">>, _, []}},
                   call_result({bad_reply, {what}}))].

check_frame_test_() ->
    [?_assertEqual(ok, check_frame(<<0:255/unit:8>>, 1)),
     ?_assertMatch({error, {protocol, 1, <<"FrameTooLarge">>, _, []}},
                   check_frame(<<0:256/unit:8>>, 1)),
     ?_assertEqual(ok, check_frame(<<0:65535/unit:8>>, 2)),
     ?_assertMatch({error, _}, check_frame(<<0:65536/unit:8>>, 2)),
     ?_assertEqual(ok, check_frame(<<0:65536/unit:8>>, 4))].

-endif.
