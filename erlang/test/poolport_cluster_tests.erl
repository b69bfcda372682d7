%% Groups: pools on many nodes behind one name (poolport_group).
%%
%% The local tests run one node. The cluster tests start distribution
%% (`epmd -daemon', shortnames) and pool nodes with OTP's `peer' module, each
%% running the poolport application and a real pool (test/fixtures/
%% poolport_test.yaml, 2 workers) in a group; this node only calls. If
%% distribution cannot start they fail, they never skip.
%%
%% Shares of calls are read from each member's `calls' counter. Waits are on
%% messages, monitors or polled state; deadlines only catch deadlocks.
-module(poolport_cluster_tests).

-include_lib("eunit/include/eunit.hrl").

-define(M, pp_handlers).
-define(DEADLOCK, 60000).
-define(E2E, poolport_e2e_tests).

%% Local: one node, no distribution.

local_test_() ->
    [{Title, {timeout, 120, Test}} || {Title, Test} <- [
        {"a pool in a group: call, cast, info, members", fun local_group/0},
        {"no members: {error, no_members} at once, cast ok", fun no_members/0},
        {"bad call options: badarg", fun bad_opts/0},
        {"the pool leaves its group while Python restarts and when it stops",
         fun leave_join/0},
        {"a member that left its group is skipped", fun failover_not_member/0},
        {"a caller killed during its call no longer counts as load", fun killed_caller/0},
        {"group in the application environment", fun app_env_group/0}
    ]].

local_group() ->
    {ok, Pool} = poolport:start(?E2E:opts(#{group => pp_local})),
    try
        ?assertEqual([Pool], poolport:members(pp_local)),
        ?assertEqual({ok, 42}, poolport:call({group, pp_local}, ?M, twice, [21])),
        ?assertEqual({ok, 42}, poolport:call({group, pp_local}, ?M, twice, [21], 5000)),
        ?assertEqual({ok, 42}, poolport:call({group, pp_local}, ?M, twice, [21], infinity,
                                             #{retry => 2})),
        ?assertMatch({error, {user, _, <<"ValueError">>, _, _}},
                     poolport:call({group, pp_local}, ?M, fail, [])),
        %% A timeout leaves no stray message, also once the late reply came.
        #{dropped := Dropped} = poolport:info(Pool),
        ?assertEqual({{error, timeout}, []}, ?E2E:in_fresh_process(fun() ->
            R = poolport:call({group, pp_local}, ?M, sleep_ms, [500], 100),
            ok = ?E2E:wait_until(fun() -> maps:get(dropped, poolport:info(Pool)) > Dropped end,
                                 ?DEADLOCK),
            R
        end)),
        ?assertEqual(ok, poolport:cast({group, pp_local}, ?M, echo, [1])),
        ?assertMatch(#{group := pp_local}, poolport:info(Pool)),
        Node = node(),
        ?assertMatch(#{group := pp_local, nodes := 1, workers := 2,
                       members := [#{pool := Pool, node := Node, workers := 2,
                                     in_flight := _, calls := _, status := running}]},
                     poolport:info({group, pp_local})),
        %% Many callers at once: every one gets its own answer.
        Results = pmap(fun(I) -> poolport:call({group, pp_local}, ?M, twice, [I]) end,
                       lists:seq(1, 200)),
        ?assertEqual([{ok, 2 * I} || I <- lists:seq(1, 200)], Results)
    after
        ok = poolport:stop(Pool)
    end,
    ?assertEqual([], poolport:members(pp_local)).

no_members() ->
    {Results, Messages} = ?E2E:in_fresh_process(fun() ->
        [poolport:call({group, pp_nobody}, ?M, echo, [1]),
         poolport:call({group, pp_nobody}, ?M, echo, [1], 1000),
         poolport:call({group, pp_nobody}, ?M, echo, [1], infinity, #{retry => 3}),
         poolport:cast({group, pp_nobody}, ?M, echo, [1]),
         poolport:members(pp_nobody)]
    end),
    E = {error, no_members},
    ?assertEqual([E, E, E, ok, []], Results),
    ?assertEqual([], Messages),
    ?assertMatch(#{group := pp_nobody, members := [], nodes := 0, workers := 0,
                   in_flight := 0},
                 poolport:info({group, pp_nobody})).

bad_opts() ->
    G = {group, pp_nobody},
    ?assertError(badarg, poolport:call(G, ?M, echo, [1], 1000, #{retry => -1})),
    ?assertError(badarg, poolport:call(G, ?M, echo, [1], 1000, #{retry => x})),
    ?assertError(badarg, poolport:call(G, ?M, echo, [1], 1000, #{bogus => 1})),
    ?assertError(badarg, poolport:call(G, ?M, echo, [1], 1000, [])),
    ?assertError(badarg, poolport:call(G, ?M, echo, [1], -1)),
    ?assertEqual({error, {bad_option, group, "g"}}, poolport:start(#{group => "g"})),
    ?assertError({badarg, {bad_option, group, 1}}, poolport:child_spec(#{group => 1})).

leave_join() ->
    {ok, Pool} = poolport:start(?E2E:opts(#{group => pp_restart})),
    try
        ?assertEqual([Pool], poolport:members(pp_restart)),
        #{os_pid := OsPid} = poolport:info(Pool),
        _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
        %% Out of the group until the new Python answers, then back.
        ok = ?E2E:wait_until(fun() -> poolport:members(pp_restart) =:= [] end, ?DEADLOCK),
        ok = ?E2E:wait_until(fun() -> poolport:members(pp_restart) =:= [Pool] end, ?DEADLOCK),
        ?assertMatch(#{restarts := 1, status := running}, poolport:info(Pool)),
        ?assertEqual({ok, 4}, poolport:call({group, pp_restart}, ?M, twice, [2]))
    after
        ok = poolport:stop(Pool)
    end,
    ?assertEqual([], poolport:members(pp_restart)),
    ?assertEqual({error, no_members}, poolport:call({group, pp_restart}, ?M, twice, [2])).

%% A group member that answers every call as a pool that has left its group
%% does (`{error, not_member}'). The real pool is kept busy so that the
%% impostor, idle, is the one chosen first: the calls still succeed.
failover_not_member() ->
    {ok, Pool} = poolport:start(?E2E:opts(#{group => pp_failover})),
    Self = self(),
    Impostor = spawn_link(fun() ->
        ok = pg:join(poolport, pp_failover, self()),
        Self ! {joined, self()},
        impostor(0)
    end),
    receive {joined, Impostor} -> ok end,
    try
        Busy = [spawn_link(fun() -> poolport:call(Pool, ?M, sleep_ms, [4000], ?DEADLOCK) end)
                || _ <- lists:seq(1, 4)],
        %% The busy pool's published load shows the 4 calls.
        ok = ?E2E:wait_until(fun() -> published_in_flight(Pool) >= 4 end, ?DEADLOCK),
        Results = [poolport:call({group, pp_failover}, ?M, twice, [I], ?DEADLOCK)
                   || I <- lists:seq(1, 5)],
        ?assertEqual([{ok, 2 * I} || I <- lists:seq(1, 5)], Results),
        Impostor ! {count, self()},
        receive {count, N} -> ?assert(N >= 1) end,
        _ = Busy
    after
        unlink(Impostor),
        exit(Impostor, kill),
        ok = poolport:stop(Pool)
    end.

killed_caller() ->
    {ok, Pool} = poolport:start(?E2E:opts(#{group => pp_killed})),
    try
        Caller = spawn(fun() -> poolport:call({group, pp_killed}, ?M, sleep_ms, [2000]) end),
        ok = ?E2E:wait_until(fun() -> outstanding(Pool) =:= 1 end, ?DEADLOCK),
        exit(Caller, kill),
        ok = ?E2E:wait_until(fun() -> outstanding(Pool) =:= 0 end, ?DEADLOCK)
    after
        ok = poolport:stop(Pool)
    end.

%% This node's calls outstanding at a member, as the group's choice sees them.
outstanding(Pool) ->
    ets:select_count(poolport_group_calls, [{{{Pool, '_'}}, [], [true]}]).

impostor(N) ->
    receive
        {'$poolport_call', member_call, Alias, _Caller, _Info, _Request} ->
            Alias ! {Alias, {error, not_member}},
            impostor(N + 1);
        {count, Pid} ->
            Pid ! {count, N},
            impostor(N)
    end.

app_env_group() ->
    _ = application:stop(poolport),
    ok = application:set_env(poolport, pools,
                             [{pp_env_member, maps:to_list(?E2E:opts(#{group => pp_env}))}]),
    try
        {ok, _} = application:ensure_all_started(poolport),
        Pool = whereis(pp_env_member),
        ?assertEqual([Pool], poolport:members(pp_env)),
        ?assertEqual({ok, 10}, poolport:call({group, pp_env}, ?M, twice, [5])),
        ok = application:stop(poolport),
        ok = application:set_env(poolport, pools, []),
        %% The application starts again, without the pool.
        ?assertEqual({error, no_members}, poolport:call({group, pp_env}, ?M, twice, [5]))
    after
        ok = application:set_env(poolport, pools, [])
    end.

%% Cluster: pool nodes started with `peer'.

cluster_test_() ->
    {setup, fun() -> start_cluster(pp_even, 3) end, fun stop_cluster/1,
     fun(Cluster) ->
         [{Title, {timeout, 300, fun() -> Test(Cluster) end}} || {Title, Test} <- [
             {"200 callers: every node answers, each within 35 % of an even share",
              fun even_share/1},
             {"a much busier node gets fewer new calls", fun busy_node/1},
             {"a caller on a pool node prefers its local member", fun local_first/1}
         ]]
     end}.

own_cluster_test_() ->
    [{Title, {timeout, 300, Test}} || {Title, Test} <- [
        {"kill -9 of a pool node under load: only its in-flight calls fail, the group heals",
         fun kill_node/0},
        {"a node that joins under load gets calls", fun join_node/0},
        {"retry => 1: a nodedown during the call becomes a success elsewhere",
         fun retry_nodedown/0}
    ]].

%% 200 processes make 5 calls each at once; shares are counted by each
%% member. The calls sleep 10 ms, so that every node serves them at the same
%% rate (2 workers) whatever share of this machine's CPU its VM gets.
even_share(#{group := G, members := Members}) ->
    Before = calls(Members),
    Results = pmap(fun(_) ->
                       [poolport:call({group, G}, ?M, sleep_ms, [10], ?DEADLOCK)
                        || _ <- lists:seq(1, 5)]
                   end, lists:seq(1, 200)),
    ?assertEqual(lists:duplicate(200, lists:duplicate(5, {ok, 10})), Results),
    Shares = delta(Before, calls(Members)),
    Total = lists:sum(maps:values(Shares)),
    ?assertEqual(1000, Total),
    Even = Total / map_size(Members),
    ?debugFmt("calls per node (even share ~.1f): ~p", [Even, Shares]),
    ?assertEqual([], [{Node, N} || {Node, N} <- maps:to_list(Shares),
                                   abs(N - Even) > 0.35 * Even]).

%% One node gets 8 long calls (4 s each, 2 workers: busy for 16 s), sent to
%% its pool directly; then 6 callers make 20 short calls each through the
%% group.
busy_node(#{group := G, members := Members}) ->
    [{BusyNode, BusyPool} | _] = lists:sort(maps:to_list(Members)),
    Long = [spawn_monitor(fun() ->
                exit({done, poolport:call(BusyPool, ?M, sleep_ms, [4000], ?DEADLOCK)})
            end) || _ <- lists:seq(1, 8)],
    %% This node has heard of the 8 calls, and that the others are idle (not
    %% still what they published during the previous test).
    ok = ?E2E:wait_until(fun() ->
             published_in_flight(BusyPool) >= 8 andalso
                 [P || P <- maps:values(Members), P =/= BusyPool,
                       published_in_flight(P) > 0] =:= []
         end, ?DEADLOCK),
    Before = calls(Members),
    Results = pmap(fun(I) ->
                       [poolport:call({group, G}, ?M, twice, [I], ?DEADLOCK)
                        || _ <- lists:seq(1, 20)]
                   end, lists:seq(1, 6)),
    ?assertEqual([lists:duplicate(20, {ok, 2 * I}) || I <- lists:seq(1, 6)], Results),
    Shares = delta(Before, calls(Members)),
    ?debugFmt("busy node ~s; short calls per node: ~p", [BusyNode, Shares]),
    Busy = maps:get(BusyNode, Shares),
    Others = maps:values(maps:remove(BusyNode, Shares)),
    [?assert(Busy * 4 =< N) || N <- Others],
    [receive {'DOWN', MRef, process, Pid, {done, R}} -> ?assertEqual({ok, 4000}, R)
     after ?DEADLOCK -> error(deadlock)
     end || {Pid, MRef} <- Long].

%% From a pool node, sequential calls through the group stay on that node
%% (its member always has a free worker).
local_first(#{group := G, members := Members}) ->
    [_, {Node, _} | _] = lists:sort(maps:to_list(Members)),
    Before = calls(Members),
    Results = erpc:call(Node, fun() ->
        [poolport:call({group, G}, ?M, twice, [I]) || I <- lists:seq(1, 20)]
    end),
    ?assertEqual([{ok, 2 * I} || I <- lists:seq(1, 20)], Results),
    Shares = delta(Before, calls(Members)),
    ?assertEqual(20, maps:get(Node, Shares)),
    ?assertEqual(20, lists:sum(maps:values(Shares))).

%% 30 callers loop on 100 ms calls; one pool node is killed with kill -9.
%% Every call either succeeds or, if it was in flight there, gets
%% {error, {nodedown, Dead}}; once pg has dropped the dead member, every call
%% succeeds.
kill_node() ->
    Cluster = #{group := G, members := Members} = start_cluster(pp_kill, 3),
    try
        [{Dead, _} | _] = lists:sort(maps:to_list(Members)),
        Load = start_load(30, fun() -> poolport:call({group, G}, ?M, sleep_ms, [100],
                                                     ?DEADLOCK) end),
        Before = calls(Members),
        ok = ?E2E:wait_until(fun() ->
                 lists:all(fun(N) -> N > 0 end, maps:values(delta(Before, calls(Members))))
             end, ?DEADLOCK),
        OsPid = erpc:call(Dead, os, getpid, []),
        _ = os:cmd("kill -9 " ++ OsPid),
        ok = ?E2E:wait_until(fun() ->
                 [P || P <- poolport:members(G), node(P) =:= Dead] =:= []
             end, ?DEADLOCK),
        Healed = erlang:monotonic_time(millisecond),
        %% Let every caller make a few more calls, then stop them.
        Alive = maps:remove(Dead, Members),
        AfterHeal = calls(Alive),
        ok = ?E2E:wait_until(fun() ->
                 lists:sum(maps:values(delta(AfterHeal, calls(Alive)))) >= 200
             end, ?DEADLOCK),
        Calls = stop_load(Load),
        Errors = [R || {_, _, R} <- Calls, R =/= {ok, 100}],
        Late = [R || {Start, _, R} <- Calls, Start > Healed, R =/= {ok, 100}],
        ?debugFmt("~b calls, ~b in flight at ~s when it died: ~p",
                  [length(Calls), length(Errors), Dead, lists:usort(Errors)]),
        ?assertEqual([], [R || R <- Errors, R =/= {error, {nodedown, Dead}}]),
        ?assert(length(Errors) >= 1),
        ?assertEqual([], Late),
        ?assert(length([x || {Start, _, _} <- Calls, Start > Healed]) >= 150)
    after
        kill_load(),
        stop_cluster(Cluster)
    end.

%% 20 callers loop on 50 ms calls over 2 nodes; a third node joins.
join_node() ->
    Cluster = #{group := G} = start_cluster(pp_join, 2),
    try
        Load = start_load(20, fun() -> poolport:call({group, G}, ?M, sleep_ms, [50],
                                                     ?DEADLOCK) end),
        New = {_Peer, NewNode, NewPool} = start_member(G),
        try
            %% From the moment this node sees the new member.
            ok = ?E2E:wait_until(fun() -> lists:member(NewPool, poolport:members(G)) end,
                                 ?DEADLOCK),
            Seen = erlang:monotonic_time(millisecond),
            ok = ?E2E:wait_until(fun() -> maps:get(calls, poolport:info(NewPool)) >= 20 end,
                                 ?DEADLOCK),
            ?debugFmt("~s answered 20 calls ~b ms after it was seen in the group",
                      [NewNode, erlang:monotonic_time(millisecond) - Seen]),
            Calls = stop_load(Load),
            ?assertEqual([], [R || {_, _, R} <- Calls, R =/= {ok, 50}])
        after
            stop_member(New)
        end
    after
        kill_load(),
        stop_cluster(Cluster)
    end.

%% Two nodes; B is busy, so a call goes to A. A is killed while the call
%% runs there: with retry => 1 it is sent to B and succeeds.
retry_nodedown() ->
    Cluster = #{group := G, members := Members} = start_cluster(pp_retry, 2),
    try
        [{NodeA, PoolA}, {NodeB, PoolB}] = lists:sort(maps:to_list(Members)),
        Busy = [spawn_monitor(fun() ->
                    exit({done, poolport:call(PoolB, ?M, sleep_ms, [1500], ?DEADLOCK)})
                end) || _ <- lists:seq(1, 4)],
        ok = ?E2E:wait_until(fun() -> published_in_flight(PoolB) >= 4 end, ?DEADLOCK),
        Self = self(),
        Caller = spawn_link(fun() ->
            Self ! {self(), poolport:call({group, G}, ?M, sleep_ms, [1000], ?DEADLOCK,
                                          #{retry => 1})}
        end),
        ok = ?E2E:wait_until(fun() -> maps:get(waiting, poolport:info(PoolA)) =:= 1 end,
                             ?DEADLOCK),
        _ = os:cmd("kill -9 " ++ erpc:call(NodeA, os, getpid, [])),
        receive
            {Caller, Result} -> ?assertEqual({ok, 1000}, Result)
        after ?DEADLOCK -> error(deadlock)
        end,
        [receive {'DOWN', MRef, process, Pid, _} -> ok after ?DEADLOCK -> error(deadlock) end
         || {Pid, MRef} <- Busy],
        %% B ran the 4 busy calls and the retried one.
        ?assertEqual(5, maps:get(calls, poolport:info(PoolB))),
        %% B is the last member: when it dies too, the retry finds nobody
        %% and the caller learns of the nodedown (not of no_members).
        ok = ?E2E:wait_until(fun() -> poolport:members(G) =:= [PoolB] end, ?DEADLOCK),
        Last = spawn_link(fun() ->
            Self ! {self(), poolport:call({group, G}, ?M, sleep_ms, [20000], ?DEADLOCK,
                                          #{retry => 1})}
        end),
        ok = ?E2E:wait_until(fun() -> maps:get(waiting, poolport:info(PoolB)) =:= 1 end,
                             ?DEADLOCK),
        _ = os:cmd("kill -9 " ++ erpc:call(NodeB, os, getpid, [])),
        receive
            {Last, LastResult} -> ?assertEqual({error, {nodedown, NodeB}}, LastResult)
        after ?DEADLOCK -> error(deadlock)
        end
    after
        stop_cluster(Cluster)
    end.

%% Helpers.

%% Start distribution and N pool nodes whose pools join Group; wait until
%% this node sees all of them in the group.
start_cluster(Group, N) ->
    WasAlive = case ?E2E:start_distribution() of
                   {ok, Alive} ->
                       Alive;
                   {error, Reason} ->
                       ?debugFmt("CANNOT START ERLANG DISTRIBUTION (~p): the cluster tests "
                                 "need epmd and distribution on this machine; they fail, "
                                 "they do not skip", [Reason]),
                       error({distribution_unavailable, Reason})
               end,
    Started = pmap(fun(_) -> start_member(Group) end, lists:seq(1, N)),
    Pools = [Pool || {_, _, Pool} <- Started],
    ok = ?E2E:wait_until(fun() -> lists:sort(poolport:members(Group)) =:= lists:sort(Pools) end,
                         ?DEADLOCK),
    #{group => Group, was_alive => WasAlive, started => Started,
      members => maps:from_list([{Node, Pool} || {_, Node, Pool} <- Started])}.

stop_cluster(#{started := Started}) ->
    _ = pmap(fun stop_member/1, Started),
    ok.

start_member(Group) ->
    {ok, Peer, Node} = peer:start(#{name => peer:random_name(poolport_member),
                                    args => ["-pa" | code:get_path()]}),
    {ok, Pool} = erpc:call(Node, poolport, start,
                           [?E2E:opts(#{group => Group, name => pp_member})]),
    {Peer, Node, Pool}.

stop_member({Peer, _Node, _Pool}) ->
    _ = (catch peer:stop(Peer)),
    ok.

%% The calls counter of each member, by node.
calls(Members) ->
    maps:map(fun(_Node, Pool) -> maps:get(calls, poolport:info(Pool)) end, Members).

delta(Before, After) ->
    maps:map(fun(Node, N) -> N - maps:get(Node, Before) end, After).

%% What this node's load publisher last heard of a pool.
published_in_flight(Pool) ->
    case ets:lookup(poolport_group_loads, Pool) of
        [{_, InFlight, _}] -> InFlight;
        [] -> 0
    end.

%% N processes call Fun in a loop until stop_load/1; each call is recorded
%% as {StartMs, EndMs, Result}.
start_load(N, Fun) ->
    Self = self(),
    Pids = [spawn_link(fun() -> load_loop(Self, Fun, []) end) || _ <- lists:seq(1, N)],
    put(load, Pids),
    Pids.

%% After a failure: the callers of start_load/2 go away.
kill_load() ->
    _ = [begin unlink(P), exit(P, kill) end || P <- get_load()],
    erase(load),
    ok.

get_load() ->
    case get(load) of
        undefined -> [];
        Pids -> Pids
    end.

load_loop(Parent, Fun, Acc) ->
    receive
        stop -> Parent ! {load, self(), lists:reverse(Acc)}
    after 0 ->
        T0 = erlang:monotonic_time(millisecond),
        R = Fun(),
        load_loop(Parent, Fun, [{T0, erlang:monotonic_time(millisecond), R} | Acc])
    end.

stop_load(Pids) ->
    [P ! stop || P <- Pids],
    Calls = lists:append([receive {load, P, C} -> C after ?DEADLOCK -> error(deadlock) end
                          || P <- Pids]),
    erase(load),
    Calls.

pmap(Fun, List) ->
    poolport_e2e_tests:pmap(Fun, List, ?DEADLOCK * 2).
