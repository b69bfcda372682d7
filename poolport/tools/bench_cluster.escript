#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noshell
%% The scale-out load generator of `poolport bench' (workload
%% `cluster'): groups of pools on several Erlang nodes of this host, through
%% the poolport OTP application (erlang/ in the repository, compiled into
%% Ebin by the bench).
%%
%%   escript bench_cluster.escript Ebin Steps Callers Calls MaxNodes TinyCalls Rounds
%%       -- Python ServeArg...
%%
%% This VM starts distribution (`epmd -daemon', shortnames) and the poolport
%% application with no pool: it only calls. It starts MaxNodes pool nodes
%% with OTP's `peer' module; on each, `poolport:start/1' runs
%% `Python -m poolport serve ... ServeArg...' in the group `poolport_bench'.
%%
%% 1. With the first pool only: TinyCalls tiny calls,
%%    `poolport.demo_handlers:echo({I, <<"abc">>})', from one caller in
%%    lock-step, once to the pool's pid and once to `{group, poolport_bench}',
%%    Rounds times interleaved (direct then group, group then direct, ...);
%%    best of each.
%% 2. For K = 1 .. MaxNodes pools in the group (one more node each time):
%%    K * Calls CPU-bound calls `burn(Steps)' through `{group, poolport_bench}'
%%    from Callers processes, each in lock-step, after an unmeasured warm-up;
%%    Rounds times, best.
%%
%% Every reply is checked. Output on stdout, one line each:
%%   result tiny:direct calls N us Microseconds
%%   result tiny:group calls N us Microseconds
%%   result scale:K calls N us Microseconds
%%   done
%% or a line starting with "error" and exit status 1.
-mode(compile).

-define(GROUP, poolport_bench).
-define(M, 'poolport.demo_handlers').

main(Args) ->
    case lists:splitwith(fun(A) -> A =/= "--" end, Args) of
        {[Ebin, Steps, Callers, Calls, MaxNodes, Tiny, Rounds], ["--", Python | ServeArgs]} ->
            try
                run(Ebin, int(Steps), int(Callers), int(Calls), int(MaxNodes), int(Tiny),
                    int(Rounds), Python, ServeArgs)
            catch
                Class:Reason:Stack ->
                    fail("~p:~p ~p", [Class, Reason, Stack])
            end;
        _ ->
            io:format("usage: bench_cluster.escript Ebin Steps Callers Calls MaxNodes "
                      "TinyCalls Rounds -- Python ServeArg...~n"),
            halt(2)
    end.

run(Ebin, Steps, Callers, Calls, MaxNodes, Tiny, Rounds, Python, ServeArgs) ->
    true = code:add_patha(Ebin),
    _ = os:cmd("epmd -daemon"),
    Name = list_to_atom("poolport_bench_" ++ os:getpid()),
    case net_kernel:start([Name, shortnames]) of
        {ok, _} -> ok;
        {error, Why} -> fail("cannot start distribution: ~p", [Why])
    end,
    {ok, _} = application:ensure_all_started(poolport),
    Opts = #{config => undefined, python => Python, args => ServeArgs, group => ?GROUP,
             start_timeout => 120000},
    Nodes = [start_node(Ebin) || _ <- lists:seq(1, MaxNodes)],
    try
        [First | More] = Nodes,
        Pool1 = add_pool(First, Opts, 1),
        tiny(Pool1, Tiny, Rounds),
        scale(1, Steps, Callers, Calls, Rounds),
        lists:foldl(fun(Node, K) ->
                        _ = add_pool(Node, Opts, K),
                        scale(K, Steps, Callers, Calls, Rounds),
                        K + 1
                    end, 2, More)
    after
        [catch peer:stop(Peer) || {Peer, _} <- Nodes]
    end,
    io:format("done~n"),
    halt(0).

start_node(Ebin) ->
    {ok, Peer, Node} = peer:start(#{name => peer:random_name(poolport_bench_pool),
                                    args => ["-pa", Ebin]}),
    {Peer, Node}.

%% Start a pool on Node and wait until this node sees K members.
add_pool({_Peer, Node}, Opts, K) ->
    {ok, Pool} = erpc:call(Node, poolport, start, [Opts], 180000),
    wait(fun() -> length(poolport:members(?GROUP)) =:= K end, 60000),
    Pool.

wait(Pred, Left) when Left > 0 ->
    case Pred() of
        true -> ok;
        false -> receive after 10 -> wait(Pred, Left - 10) end
    end;
wait(_Pred, _Left) ->
    fail("the group did not show the new pool within 60 s", []).

%% Tiny lock-step calls, to the pid and through the group, interleaved.
tiny(Pool, Calls, Rounds) ->
    Direct = fun(I) -> poolport:call(Pool, ?M, echo, [{I, <<"abc">>}]) end,
    Group = fun(I) -> poolport:call({group, ?GROUP}, ?M, echo, [{I, <<"abc">>}]) end,
    _ = lockstep(Direct, 200), _ = lockstep(Group, 200),  % warm-up
    %% Alternate which goes first, so neither always follows the other.
    Times = [case R rem 2 of
                 1 -> D = lockstep(Direct, Calls), {D, lockstep(Group, Calls)};
                 0 -> G = lockstep(Group, Calls), {lockstep(Direct, Calls), G}
             end || R <- lists:seq(1, Rounds)],
    io:format("result tiny:direct calls ~b us ~b~n", [Calls, lists:min([D || {D, _} <- Times])]),
    io:format("result tiny:group calls ~b us ~b~n", [Calls, lists:min([G || {_, G} <- Times])]).

lockstep(Call, N) ->
    T0 = erlang:monotonic_time(microsecond),
    lists:foreach(fun(I) ->
                      case Call(I) of
                          {ok, {I, <<"abc">>}} -> ok;
                          Other -> fail("tiny call ~b: ~p", [I, Other])
                      end
                  end, lists:seq(1, N)),
    erlang:monotonic_time(microsecond) - T0.

%% K * Calls burn calls through the group from Callers processes.
scale(K, Steps, Callers, Calls, Rounds) ->
    Expected = burn_result(0, 0, Steps),
    Total = K * Calls,
    _ = burn_run(Steps, Expected, Callers, max(Callers, K * 4)),  % warm-up
    Best = lists:min([burn_run(Steps, Expected, Callers, Total) || _ <- lists:seq(1, Rounds)]),
    io:format("result scale:~b calls ~b us ~b~n", [K, Total, Best]).

burn_run(Steps, Expected, Callers, Total) ->
    Next = atomics:new(1, []),
    Self = self(),
    T0 = erlang:monotonic_time(microsecond),
    Pids = [spawn_link(fun() -> burn_caller(Next, Total, Steps, Expected), Self ! {done, self()} end)
            || _ <- lists:seq(1, Callers)],
    [receive {done, P} -> ok end || P <- Pids],
    erlang:monotonic_time(microsecond) - T0.

burn_caller(Next, Total, Steps, Expected) ->
    case atomics:add_get(Next, 1, 1) of
        I when I =< Total ->
            case poolport:call({group, ?GROUP}, ?M, burn, [Steps], 600000) of
                {ok, Expected} -> burn_caller(Next, Total, Steps, Expected);
                Other -> fail("burn call ~b: ~p", [I, Other])
            end;
        _ ->
            ok
    end.

burn_result(Acc, I, Steps) when I < Steps -> burn_result((Acc * 31 + I) rem 1000003, I + 1, Steps);
burn_result(Acc, _, _) -> Acc.

int(S) -> list_to_integer(S).

fail(Fmt, Args) ->
    io:format("error " ++ Fmt ++ "~n", Args),
    halt(1).
