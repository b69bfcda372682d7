%% End-to-end tests of streams (poolport:stream/5, next/2, cancel/1) against
%% a real `python -m poolport serve'. Handlers: test/fixtures/pp_streams.py.
%% Timeouts only catch deadlocks; no assertion depends on how fast anything runs.
-module(poolport_stream_tests).

-include_lib("eunit/include/eunit.hrl").

-define(S, pp_streams).

stream_test_() ->
    {setup, fun start/0, fun(Pool) -> ok = poolport:stop(Pool) end,
     fun(Pool) ->
         [{Title, {timeout, 300, fun() -> Test(Pool) end}} || {Title, Test} <- [
             {"items in order, then done; the stream is closed after", fun in_order/1},
             {"100,000 small items while other calls keep answering", fun many_small/1},
             {"200 items of 1 MB", fun big_items/1},
             {"a slow consumer: Python never runs more than a window ahead", fun window/1},
             {"cancel runs the generator's finally", fun cancel_finally/1},
             {"the consumer dying cancels the stream", fun consumer_dies/1},
             {"cancel at once, twice, and while another process waits in next", fun cancel_points/1},
             {"an error mid-stream ends it with the user error", fun error_mid_stream/1},
             {"a worker crash mid-stream is WorkerCrashed; the pool heals", fun crash_mid_stream/1},
             {"the timeout applies per item", fun item_timeout/1},
             {"next/2 timing out leaves the stream open", fun next_timeout/1},
             {"a consumer that never pulls is cut off after idle_timeout", fun idle/1},
             {"a generator called with call is IsStream; bad options are badarg", fun wrong_kind/1},
             {"no stream is left open in the pool", fun none_left/1}
         ]]
     end}.

start() ->
    {ok, Pool} = poolport:start_link(poolport_e2e_tests:opts(#{})),
    unlink(Pool),
    Pool.

%% Every item up to the end: {Items, Last}.
drain(Stream) ->
    drain(Stream, []).

drain(Stream, Acc) ->
    case poolport:next(Stream, 60000) of
        {ok, Item} -> drain(Stream, [Item | Acc]);
        Last -> {lists:reverse(Acc), Last}
    end.

tmp(Name) ->
    Path = filename:join(os:getenv("TMPDIR", "/tmp"),
                         "pp_stream_" ++ Name ++ "_" ++ os:getpid() ++ "_"
                         ++ integer_to_list(erlang:unique_integer([positive]))),
    _ = file:delete(Path),
    Path.

in_order(Pool) ->
    {ok, S} = poolport:stream(Pool, ?S, count, [5]),
    ?assertEqual({[0, 1, 2, 3, 4], done}, drain(S)),
    ?assertEqual({error, no_stream}, poolport:next(S)),
    ?assertEqual(ok, poolport:cancel(S)),
    {ok, R} = poolport:stream(Pool, ?S, rows, [2], #{window => 1}),
    ?assertEqual({[#{<<"row">> => 0}, #{<<"row">> => 1}], done}, drain(R)).

many_small(Pool) ->
    Self = self(),
    Caller = spawn_link(fun() -> calls(Pool, Self, 0) end),
    {ok, S} = poolport:stream(Pool, ?S, count, [100000], #{window => 256}),
    {Items, Last} = drain_calling(Pool, S, 0, []),
    Caller ! stop,
    receive {calls, _} -> ok after 60000 -> error(no_calls) end,
    ?assertEqual(done, Last),
    ?assertEqual(100000, length(Items)),
    ?assert(Items =:= lists:seq(0, 99999)).

%% drain/1 that makes a call of its own every 10,000 items: the stream's
%% open, other calls are answered meanwhile.
drain_calling(Pool, Stream, N, Acc) ->
    case N rem 10000 of
        0 -> ?assertEqual({ok, 2 * N}, poolport:call(Pool, pp_handlers, twice, [N]));
        _ -> ok
    end,
    case poolport:next(Stream, 60000) of
        {ok, Item} -> drain_calling(Pool, Stream, N + 1, [Item | Acc]);
        Last -> {lists:reverse(Acc), Last}
    end.

%% Calls in a loop until told to stop, each checked; reports how many.
calls(Pool, Parent, N) ->
    receive
        stop -> Parent ! {calls, N}
    after 0 ->
        {ok, Twice} = poolport:call(Pool, pp_handlers, twice, [N]),
        Twice = 2 * N,
        calls(Pool, Parent, N + 1)
    end.

big_items(Pool) ->
    {ok, S} = poolport:stream(Pool, ?S, blobs, [200, 1 bsl 20], #{window => 8}),
    {Items, Last} = drain(S),
    ?assertEqual(done, Last),
    ?assertEqual(lists:seq(0, 199), [I || <<I:32, _/binary>> <- Items]),
    ?assertEqual([1 bsl 20], lists:usort([byte_size(B) || B <- Items])).

window(Pool) ->
    Path = tmp("counted"),
    Window = 4,
    {ok, S} = poolport:stream(Pool, ?S, counted, [1000, list_to_binary(Path)],
                              #{window => Window}),
    Produced = fun() ->
                   case file:read_file(Path) of
                       {ok, Text} when Text =/= <<>> -> binary_to_integer(Text);
                       _ -> 0
                   end
               end,
    %% Wait until Python has filled the window, then check at every step
    %% that it never runs further ahead than the credit given.
    ok = poolport_e2e_tests:wait_until(fun() -> Produced() >= Window end, 60000),
    lists:foreach(fun(Taken) ->
                      {ok, _} = poolport:next(S),
                      ?assert(Produced() =< Taken + Window)
                  end, lists:seq(1, 20)),
    ok = poolport:cancel(S),
    ?assert(Produced() =< 20 + Window).

cancel_finally(Pool) ->
    Path = tmp("guarded"),
    {ok, S} = poolport:stream(Pool, ?S, guarded, [1000000, list_to_binary(Path)], #{window => 2}),
    ?assertEqual({ok, 0}, poolport:next(S)),
    ok = poolport:cancel(S),
    ok = poolport_e2e_tests:wait_until(fun() -> file:read_file(Path) =:= {ok, <<"closed">>} end,
                                        60000),
    ?assertEqual({error, no_stream}, poolport:next(S)),
    ?assertEqual({ok, 2}, poolport:call(Pool, pp_handlers, twice, [1])).

consumer_dies(Pool) ->
    Path = tmp("dies"),
    {Pid, MRef} = spawn_monitor(fun() ->
        {ok, S} = poolport:stream(Pool, ?S, guarded, [1000000, list_to_binary(Path)]),
        {ok, 0} = poolport:next(S),
        exit(gone)
    end),
    receive {'DOWN', MRef, process, Pid, gone} -> ok after 60000 -> error(consumer_stuck) end,
    ok = poolport_e2e_tests:wait_until(fun() -> file:read_file(Path) =:= {ok, <<"closed">>} end,
                                        60000).

cancel_points(Pool) ->
    %% Right after the start, before any item was asked for; then again.
    Path = tmp("at_once"),
    {ok, S} = poolport:stream(Pool, ?S, guarded, [1000000, list_to_binary(Path)]),
    ok = poolport:cancel(S),
    ok = poolport:cancel(S),
    ok = poolport_e2e_tests:wait_until(fun() -> file:read_file(Path) =:= {ok, <<"closed">>} end,
                                        60000),
    %% A next waiting in another process gets {error, cancelled}.
    {ok, T} = poolport:stream(Pool, ?S, slow, [1, 30000]),
    Self = self(),
    Waiter = spawn_link(fun() -> Self ! {waited, poolport:next(T, 60000)} end),
    ok = poolport_e2e_tests:wait_until(
           fun() -> {status, waiting} =:= erlang:process_info(Waiter, status) end, 60000),
    ok = poolport:cancel(T),
    receive {waited, R} -> ?assertEqual({error, cancelled}, R) after 60000 -> error(no_answer) end,
    %% The pool serves on: both workers are free again.
    ?assertEqual({[0, 1], done}, drain(element(2, poolport:stream(Pool, ?S, count, [2])))),
    ?assertEqual({[0], done}, drain(element(2, poolport:stream(Pool, ?S, count, [1])))).

error_mid_stream(Pool) ->
    {ok, S} = poolport:stream(Pool, ?S, fail_after, [2]),
    ?assertMatch({[0, 1], {error, {user, 0, <<"ValueError">>, <<"failed after 2 items">>, [_ | _]}}},
                 drain(S)),
    {ok, U} = poolport:stream(Pool, ?S, unencodable, [1]),
    ?assertMatch({[0], {error, {user, 0, <<"EncodeError">>, _, _}}}, drain(U)).

crash_mid_stream(Pool) ->
    case poolport:stream(Pool, ?S, crash_after, [3]) of
        {ok, S} ->
            {Items, Last} = drain(S),
            ?assert(lists:prefix(Items, [0, 1, 2])),
            ?assertMatch({error, {server, 4, <<"WorkerCrashed">>, _, _}}, Last);
        Error ->  % the worker died before its start reply was taken
            ?assertMatch({error, {server, 4, <<"WorkerCrashed">>, _, _}}, Error)
    end,
    ?assertEqual({ok, 8}, poolport:call(Pool, pp_handlers, twice, [4])),
    {ok, S2} = poolport:stream(Pool, ?S, count, [2]),
    ?assertEqual({[0, 1], done}, drain(S2)).

item_timeout(Pool) ->
    {ok, S} = poolport:stream(Pool, ?S, slow, [3, 200], #{timeout => 2000}),
    ?assertEqual({[0, 1, 2], done}, drain(S)),  % 600 ms in all: the limit is per item
    {ok, T} = poolport:stream(Pool, ?S, slow, [3, 30000], #{timeout => 300}),
    ?assertEqual({[], {error, timeout}}, drain(T)).

next_timeout(Pool) ->
    {ok, S} = poolport:stream(Pool, ?S, slow, [1, 3000]),
    ?assertEqual({error, timeout}, poolport:next(S, 1)),
    ?assertEqual({ok, 0}, poolport:next(S, 60000)),
    ?assertEqual(done, poolport:next(S, 60000)).

idle(Pool) ->
    Path = tmp("idle"),
    {ok, S} = poolport:stream(Pool, ?S, guarded, [1000000, list_to_binary(Path)],
                              #{window => 2, idle_timeout => 200}),
    %% Nobody pulls: Python closes the generator after the idle limit.
    ok = poolport_e2e_tests:wait_until(fun() -> file:read_file(Path) =:= {ok, <<"closed">>} end,
                                        60000),
    %% The two items of the window, then the idle limit's end.
    ?assertEqual({[0, 1], {error, timeout}}, drain(S)).

wrong_kind(Pool) ->
    ?assertMatch({error, {server, 6, <<"IsStream">>, _, _}}, poolport:call(Pool, ?S, count, [3])),
    ?assertMatch({error, {server, 6, <<"NotAStream">>, _, _}},
                 poolport:stream(Pool, ?S, not_a_stream, [])),
    ?assertError(badarg, poolport:stream(Pool, ?S, count, [1], #{window => 0})),
    ?assertError(badarg, poolport:stream(Pool, ?S, count, [1], #{colour => blue})),
    ?assertError(badarg, poolport:stream({group, g}, ?S, count, [1], #{})).

none_left(Pool) ->
    ok = poolport_e2e_tests:wait_until(fun() -> maps:get(streams, poolport:info(Pool)) =:= 0 end,
                                        60000),
    ?assertMatch(#{misaligned := 0, restarts := 0}, poolport:info(Pool)).

port_closed_test_() ->
    {timeout, 120, fun() ->
        {ok, Pool} = poolport:start_link(poolport_e2e_tests:opts(#{})),
        unlink(Pool),
        {ok, S} = poolport:stream(Pool, ?S, forever, [], #{window => 2}),
        ?assertEqual({ok, 0}, poolport:next(S)),
        #{os_pid := OsPid} = poolport:info(Pool),
        os:cmd("kill -9 " ++ integer_to_list(OsPid)),
        %% What was buffered, then the port's end.
        {Items, Last} = drain(S),
        ?assert(lists:prefix(Items, [1, 2, 3])),
        ?assertEqual({error, port_closed}, Last),
        ok = poolport_e2e_tests:wait_until(
               fun() -> maps:get(status, poolport:info(Pool)) =:= running end, 60000),
        {ok, T} = poolport:stream(Pool, ?S, count, [2]),
        ?assertEqual({[0, 1], done}, drain(T)),
        ok = poolport:stop(Pool)
    end}.
