%% @doc The demo "user" node (deploy/entrypoint.sh app).
%%
%% A plain Erlang node without Python: it joins the pool nodes over Erlang
%% distribution, finds their pools through the `pg' group
%% `{poolport, PoolName}' and spreads a demo workload over all of them with
%% `poolport:call(PoolPid, M, F, A)' (a pool's pid works from any node; the
%% poolport application only needs to be in the code path here, it is not
%% started). Every round it prints which node answered what, and a summary
%% line (`round N ok nodes=... workers=...') that tests read.
%%
%% Finding the pool nodes: the pool nodes are named `pool@<container IP>', so
%% the A records of the pool service's DNS name (one per replica, also after
%% `docker compose up --scale pool=N') give their node names; the node pings
%% them every round, then pg tells which of them run the pool. Outside
%% compose, list nodes in POOLPORT_SEED_NODES.
%%
%% Environment (defaults in brackets):
%%   POOLPORT_POOL_SERVICE    DNS name of the pool nodes ["pool"; "" = none]
%%   POOLPORT_POOL_NODE_NAME  their node name before the @ ["pool"]
%%   POOLPORT_SEED_NODES      extra pool nodes, comma separated [""]
%%   POOLPORT_POOL_NAME       the pool (pg group {poolport, Name}) ["demo"]
%%   POOLPORT_DEMO_CALLS      poolport_demo:burn calls per round [24]
%%   POOLPORT_DEMO_STEPS      steps of each burn call [300000]
%%   POOLPORT_DEMO_INTERVAL   seconds between rounds [10]
%%   POOLPORT_DEMO_ROUNDS     rounds to run, 0 = forever [0]; after the last
%%                            one the node exits 0 if it succeeded, else 1
%%   POOLPORT_CALL_TIMEOUT    ms per call [60000]
-module(app_node).

-export([start/0]).
-export([discover/1]).
-export([burn/1]).

%% Internal.
-export([main/0]).

-define(SCOPE, pg).
-define(DEMO_MODULE, poolport_demo).
-define(PING_TIMEOUT, 8000).
-define(PG_WAIT, 5000).
-define(RETRY_EMPTY, 2000).

%% @doc Spawn the demo loop; it halts the node when it ends or crashes.
-spec start() -> ok.
start() ->
    _ = spawn(fun() ->
                  Code = try main()
                         catch Class:Reason:Stack ->
                             io:format(standard_error, "app node crashed: ~p:~p~n~p~n",
                                       [Class, Reason, Stack]),
                             2
                         end,
                  erlang:halt(Code, [{flush, true}])
              end),
    ok.

%% @private
main() ->
    ok = ensure_pg(),
    Cfg = config(),
    io:format("app node ~s: pool ~p, pool nodes from DNS name ~p and seeds ~p; "
              "~p x ~s:burn(~p) per round~n",
              [node(), maps:get(pool, Cfg), maps:get(service, Cfg),
               maps:get(seeds, Cfg), maps:get(calls, Cfg), ?DEMO_MODULE,
               maps:get(steps, Cfg)]),
    loop(Cfg, 1, undefined).

loop(#{rounds := Rounds}, Round, Last) when Rounds > 0, Round > Rounds ->
    case Last of ok -> 0; _ -> 1 end;
loop(Cfg, Round, Last) ->
    case discover(Cfg) of
        [] ->
            io:format("no pool nodes in pg group ~p yet (connected: ~p); retrying~n",
                      [group(Cfg), nodes()]),
            timer:sleep(?RETRY_EMPTY),
            loop(Cfg, Round, Last);
        Members ->
            Result = round(Cfg, Round, Members),
            case maps:get(rounds, Cfg) of
                Round -> ok;
                _ -> timer:sleep(maps:get(interval, Cfg) * 1000)
            end,
            loop(Cfg, Round + 1, Result)
    end.

%% @doc Connect to the pool nodes and return the pool pids of the pg group,
%% one per node, sorted by node.
-spec discover(map()) -> [pid()].
discover(Cfg) ->
    Candidates = lists:usort(maps:get(seeds, Cfg) ++ dns_nodes(Cfg)),
    ping_all([N || N <- Candidates, not lists:member(N, nodes())]),
    Connected = [N || N <- Candidates, lists:member(N, nodes())],
    wait_members(group(Cfg), Connected, erlang:monotonic_time(millisecond) + ?PG_WAIT).

wait_members(Group, Connected, Deadline) ->
    Members = pg:get_members(?SCOPE, Group),
    Missing = Connected -- [node(P) || P <- Members],
    case Missing =/= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true ->
            timer:sleep(100),
            wait_members(Group, Connected, Deadline);
        false ->
            %% One pool process per node (a pool restarting may briefly show two).
            ByNode = maps:from_list([{node(P), P} || P <- lists:sort(Members)]),
            [P || {_, P} <- lists:sort(maps:to_list(ByNode))]
    end.

dns_nodes(#{service := ""}) ->
    [];
dns_nodes(#{service := Service, node_name := Name}) ->
    case inet:getaddrs(Service, inet) of
        {ok, Addrs} -> [list_to_atom(Name ++ "@" ++ inet:ntoa(A)) || A <- Addrs];
        {error, _} -> []
    end.

ping_all(Nodes) ->
    Self = self(),
    Refs = [begin
                Ref = make_ref(),
                _ = spawn(fun() -> Self ! {Ref, net_adm:ping(N)} end),
                Ref
            end || N <- Nodes],
    Deadline = erlang:monotonic_time(millisecond) + ?PING_TIMEOUT,
    [receive {Ref, _} -> ok
     after max(0, Deadline - erlang:monotonic_time(millisecond)) -> timeout
     end || Ref <- Refs],
    ok.

%% One round: info from every pool, a twice/1 call on each, then the burn
%% calls spread round-robin over all pools, in parallel.
round(Cfg, Round, Pools) ->
    Nodes = [node(P) || P <- Pools],
    io:format("round ~p: ~p pool node(s): ~s~n", [Round, length(Pools), join(Nodes)]),
    Workers = [{node(P), pool_workers(P)} || P <- Pools],
    Timeout = maps:get(timeout, Cfg),
    Twice = [begin
                 R = safe_call(P, twice, [Round], Timeout),
                 io:format("  twice(~p) = ~s   answered by ~s (workers=~p)~n",
                           [Round, show(R), node(P), proplists:get_value(node(P), Workers)]),
                 R =:= {ok, 2 * Round}
             end || P <- Pools],
    Steps = maps:get(steps, Cfg),
    Expected = burn(Steps),
    N = maps:get(calls, Cfg),
    Assigned = lists:zip(lists:seq(1, N), assign(N, Pools)),
    T0 = erlang:monotonic_time(millisecond),
    Results = pmap(fun({_, P}) -> {node(P), safe_call(P, burn, [Steps], Timeout)} end,
                   Assigned),
    Ms = erlang:monotonic_time(millisecond) - T0,
    io:format("  ~p x burn(~p) spread over ~p node(s) in ~p ms (expected result ~p):~n",
              [N, Steps, length(Pools), Ms, Expected]),
    PerNode = [{Node, [R || {Nd, R} <- Results, Nd =:= Node]} || Node <- Nodes],
    BurnOk = [begin
                  Ok = length([x || {ok, V} <- Rs, V =:= Expected]),
                  Bad = [R || R <- Rs, R =/= {ok, Expected}],
                  io:format("    ~s answered ~p call(s): ~p ok~s~n",
                            [Node, length(Rs), Ok, failures(Bad)]),
                  Bad =:= []
              end || {Node, Rs} <- PerNode],
    WorkersStr = join([io_lib:format("~s:~p", [Nd, W]) || {Nd, W} <- Workers]),
    case lists:all(fun(X) -> X end, Twice ++ BurnOk) of
        true ->
            io:format("round ~p ok nodes=~s workers=~s~n", [Round, join(Nodes), WorkersStr]),
            ok;
        false ->
            io:format("round ~p FAILED nodes=~s workers=~s~n",
                      [Round, join(Nodes), WorkersStr]),
            error
    end.

%% @doc The demo handler's burn/1 computed in Erlang, to check the replies.
-spec burn(non_neg_integer()) -> non_neg_integer().
burn(Steps) ->
    burn(0, Steps, 0).

burn(I, Steps, Acc) when I < Steps -> burn(I + 1, Steps, (Acc * 31 + I) rem 1000003);
burn(_, _, Acc) -> Acc.

assign(N, Pools) ->
    K = length(Pools),
    [lists:nth((I rem K) + 1, Pools) || I <- lists:seq(0, N - 1)].

pmap(F, Xs) ->
    Self = self(),
    Refs = [begin
                Ref = make_ref(),
                _ = spawn(fun() -> Self ! {Ref, F(X)} end),
                Ref
            end || X <- Xs],
    [receive {Ref, R} -> R end || Ref <- Refs].

safe_call(Pool, Fun, Args, Timeout) ->
    try poolport:call(Pool, ?DEMO_MODULE, Fun, Args, Timeout)
    catch exit:Reason -> {error, {exit, Reason}}
    end.

pool_workers(Pool) ->
    try poolport:info(Pool) of
        #{workers := W} -> W;
        _ -> undefined
    catch exit:_ -> unreachable
    end.

failures([]) -> "";
failures(Bad) -> io_lib:format(", ~p failed: ~0p", [length(Bad), hd(Bad)]).

show({ok, V}) -> io_lib:format("~0p", [V]);
show(Other) -> io_lib:format("~0p", [Other]).

join(Items) ->
    lists:join(",", [io_lib:format("~s", [I]) || I <- Items]).

group(#{pool := Pool}) ->
    {poolport, Pool}.

ensure_pg() ->
    case whereis(?SCOPE) of
        undefined -> {ok, _} = pg:start(?SCOPE), ok;
        _ -> ok
    end.

config() ->
    #{service => env("POOLPORT_POOL_SERVICE", "pool"),
      node_name => env("POOLPORT_POOL_NODE_NAME", "pool"),
      seeds => [list_to_atom(string:trim(S))
                || S <- string:lexemes(env("POOLPORT_SEED_NODES", ""), ", "),
                   string:trim(S) =/= ""],
      pool => list_to_atom(env("POOLPORT_POOL_NAME", "demo")),
      calls => int_env("POOLPORT_DEMO_CALLS", 24),
      steps => int_env("POOLPORT_DEMO_STEPS", 300000),
      interval => int_env("POOLPORT_DEMO_INTERVAL", 10),
      rounds => int_env("POOLPORT_DEMO_ROUNDS", 0),
      timeout => int_env("POOLPORT_CALL_TIMEOUT", 60000)}.

env(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        Value -> Value
    end.

int_env(Name, Default) ->
    case string:to_integer(env(Name, "")) of
        {I, ""} when I >= 0 -> I;
        _ -> Default
    end.
