%% End-to-end tests of callbacks (poolport.erlang.call/cast in a Python
%% handler, the `callbacks' pool option) against a real `python -m poolport
%% serve'. Handlers: test/fixtures/pp_callbacks.py.
-module(poolport_callback_tests).

-include_lib("eunit/include/eunit.hrl").

-define(C, pp_callbacks).
-define(ALLOWED, [{ets, lookup}, {erlang, error}, {erlang, send}, {erlang, hd}, timer,
                  {?MODULE, rendezvous}, {?MODULE, relay}]).

-export([rendezvous/1, relay/2]).

callback_test_() ->
    {setup, fun start/0, fun stop/1,
     fun({Pool, _Table}) ->
         [{Title, {timeout, 300, fun() -> Test(Pool) end}} || {Title, Test} <- [
             {"a handler reads an ETS table through a callback", fun lookup/1},
             {"callbacks from every worker at once, many per call", fun parallel/1},
             {"an Erlang error is raised in Python as ErlangError", fun errors/1},
             {"a function not in the callbacks option is refused", fun refused/1},
             {"a callback that outlives its timeout", fun timeout/1},
             {"a cast runs on the node; pids and any term round-trip", fun cast/1},
             {"a stream's items from callbacks", fun stream/1},
             {"a callback that calls its own pool times out, and the pool serves on", fun nested/1},
             {"the pool stays aligned", fun aligned/1}
         ]]
     end}.

start() ->
    Table = ets:new(pp_callback_prices, [named_table, public, {read_concurrency, true}]),
    true = ets:insert(Table, [{I, I * I} || I <- lists:seq(0, 999)]),
    {ok, Pool} = poolport:start_link(poolport_e2e_tests:opts(#{callbacks => ?ALLOWED})),
    unlink(Pool),
    {Pool, Table}.

stop({Pool, Table}) ->
    ok = poolport:stop(Pool),
    ets:delete(Table).

lookup(Pool) ->
    ?assertEqual({ok, [{7, 49}]}, poolport:call(Pool, ?C, lookup, [pp_callback_prices, 7])),
    ?assertEqual({ok, []}, poolport:call(Pool, ?C, lookup, [pp_callback_prices, nope])).

parallel(Pool) ->
    Keys = lists:seq(0, 199),
    Expected = [[{K, K * K}] || K <- Keys],
    Results = poolport_e2e_tests:pmap(
                fun(_) -> poolport:call(Pool, ?C, lookups, [pp_callback_prices, Keys], 60000) end,
                lists:seq(1, 20), 120000),
    ?assertEqual([Expected], lists:usort([R || {ok, [_Pid, R]} <- Results])),
    ?assertEqual(20, length([ok || {ok, _} <- Results])),
    %% Two calls that each wait in a callback until two callbacks wait: they
    %% end only if both workers call back at once.
    Met = poolport_e2e_tests:pmap(fun(_) -> poolport:call(Pool, ?C, meet, [2], 60000) end,
                                  [1, 2], 120000),
    ?assertMatch([{ok, [_, 2]}, {ok, [_, 2]}], Met),
    ?assertEqual(2, length(lists:usort([P || {ok, [P, _]} <- Met]))).

%% A callback (allowed in this suite): wait until N callers have arrived.
rendezvous(N) ->
    ets:update_counter(pp_callback_prices, arrived, 1, {arrived, 0}),
    wait_arrived(N).

wait_arrived(N) ->
    case ets:lookup(pp_callback_prices, arrived) of
        [{arrived, M}] when M >= N -> M;
        _ -> timer:sleep(5), wait_arrived(N)
    end.

errors(Pool) ->
    ?assertMatch({ok, [<<"error">>, <<"boom">>, true]}, poolport:call(Pool, ?C, failing, [])),
    ?assertMatch({error, {user, 0, <<"ErlangError">>, <<"error: boom">>, _}},
                 poolport:call(Pool, ?C, uncaught, [])).

refused(Pool) ->
    {ok, [<<"error">>, Reason]} = poolport:call(Pool, ?C, refused, []),
    ?assertMatch({_, _}, binary:match(Reason, <<"os:cmd/1 is not in the pool's callbacks option">>)).

timeout(Pool) ->
    {ok, [<<"exit">>, Reason]} = poolport:call(Pool, ?C, slow, [60000, 0.2], 30000),
    ?assertMatch({_, _}, binary:match(Reason, <<"timeout">>)),
    ?assertEqual({ok, ok}, poolport:call(Pool, ?C, slow, [1, 5])).

cast(Pool) ->
    Ref = make_ref(),
    ?assertEqual({ok, <<"sent">>}, poolport:call(Pool, ?C, notify, [self(), {hello, Ref}])),
    receive {hello, Ref} -> ok after 30000 -> error(no_message) end,
    Terms = [self(), make_ref(), <<"bin">>, {a, [1, 2.5, #{k => v}]}, 1 bsl 80],
    [?assertEqual({ok, T}, poolport:call(Pool, ?C, echo_back, [T])) || T <- Terms].

stream(Pool) ->
    {ok, S} = poolport:stream(Pool, ?C, counting_stream, [pp_callback_prices, 3]),
    ?assertEqual({ok, [{0, 0}]}, poolport:next(S)),
    ?assertEqual({ok, [{1, 1}]}, poolport:next(S)),
    ?assertEqual({ok, [{2, 4}]}, poolport:next(S)),
    ?assertEqual(done, poolport:next(S)).

%% A callback (allowed in this suite): a call to the same pool, from the callback's process.
relay(Pool, X) ->
    {ok, X} = poolport:call(Pool, ?C, plain, [X], 30000),
    X.

%% A callback must not call its own pool: replies leave in request order, so
%% the inner call's reply waits for the handler's, which waits for it. The
%% callback's timeout ends the wait (as documented); the inner call's reply,
%% once it comes, goes to no one, and the pool serves on, aligned.
nested(Pool) ->
    {ok, [<<"exit">>, Reason]} = poolport:call(Pool, ?C, nested, [Pool, 1, 0.5], 30000),
    ?assertMatch({_, _}, binary:match(Reason, <<"timeout">>)),
    ?assertEqual({ok, 5}, poolport:call(Pool, ?C, plain, [5])),
    ?assertMatch(#{misaligned := 0}, poolport:info(Pool)).

aligned(Pool) ->
    ?assertMatch(#{misaligned := 0, restarts := 0}, poolport:info(Pool)).

%% With no `callbacks' option every callback is refused.
default_refused_test_() ->
    {timeout, 120, fun() ->
        {ok, Pool} = poolport:start_link(poolport_e2e_tests:opts(#{})),
        unlink(Pool),
        try
            {ok, [<<"error">>, Reason]} = poolport:call(Pool, ?C, refused, []),
            ?assertMatch({_, _}, binary:match(Reason, <<"not in the pool's callbacks option">>)),
            ?assertMatch({ok, [<<"error">>, _, false]}, poolport:call(Pool, ?C, failing, []))
        after
            ok = poolport:stop(Pool)
        end
    end}.

bad_option_test() ->
    ?assertEqual({error, {bad_option, callbacks, [{ets}]}},
                 poolport_opts:check_opts(#{callbacks => [{ets}]})).
