%% @doc The demo "user" node (deploy/entrypoint.sh app).
%%
%% A plain Erlang node without Python: it runs the poolport application
%% with no pools of its own (for the group scope), connects to the pool
%% nodes over Erlang distribution and calls the group `demo' with
%% `poolport:call({group, demo}, M, F, A)': poolport picks a member on any
%% pool node, by load, and fails over when one goes away. Every round it
%% prints which node answered how many calls, and a summary line
%% (`round N ok nodes=... workers=...', the nodes that answered) that tests
%% read.
%%
%% Connecting to the pool nodes is the only deployment glue left here: they
%% are named `pool@<container IP>', so the A records of the pool service's
%% DNS name (one per replica, also after `docker compose up --scale pool=N')
%% give their node names; the node pings them every round. Outside compose,
%% list nodes in POOLPORT_SEED_NODES.
%%
%% Environment (defaults in brackets):
%%   POOLPORT_POOL_SERVICE    DNS name of the pool nodes ["pool"; "" = none]
%%   POOLPORT_POOL_NODE_NAME  their node name before the @ ["pool"]
%%   POOLPORT_SEED_NODES      extra pool nodes, comma separated [""]
%%   POOLPORT_POOL_NAME       the group to call ["demo"]
%%   POOLPORT_DEMO_CALLS      poolport_demo:burn calls per round [24]
%%   POOLPORT_DEMO_STEPS      steps of each burn call [300000]
%%   POOLPORT_DEMO_INTERVAL   seconds between rounds [10]
%%   POOLPORT_DEMO_ROUNDS     rounds to run, 0 = forever [0]; after the last
%%                            one the node exits 0 if it succeeded, else 1
%%   POOLPORT_CALL_TIMEOUT    ms per call [60000]
-module(app_node).

-export([start/0]).
-export([connect/1]).
-export([burn/1]).

%% Internal.
-export([main/0]).

-define(DEMO_MODULE, poolport_demo).
-define(PING_TIMEOUT, 8000).
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
    {ok, _} = application:ensure_all_started(poolport),
    Cfg = config(),
    io:format("app node ~s: group ~p, pool nodes from DNS name ~p and seeds ~p; "
              "~p x ~s:burn(~p) per round~n",
              [node(), maps:get(group, Cfg), maps:get(service, Cfg),
               maps:get(seeds, Cfg), maps:get(calls, Cfg), ?DEMO_MODULE,
               maps:get(steps, Cfg)]),
    loop(Cfg, 1, undefined).

loop(#{rounds := Rounds}, Round, Last) when Rounds > 0, Round > Rounds ->
    case Last of ok -> 0; _ -> 1 end;
loop(#{group := Group} = Cfg, Round, Last) ->
    connect(Cfg),
    case poolport:members(Group) of
        [] ->
            io:format("no members of group ~p yet (connected: ~p); retrying~n",
                      [Group, nodes()]),
            timer:sleep(?RETRY_EMPTY),
            loop(Cfg, Round, Last);
        _ ->
            Result = round(Cfg, Round),
            case maps:get(rounds, Cfg) of
                Round -> ok;
                _ -> timer:sleep(maps:get(interval, Cfg) * 1000)
            end,
            loop(Cfg, Round + 1, Result)
    end.

%% @doc Connect to the pool nodes (the DNS name's addresses and the seeds).
-spec connect(map()) -> ok.
connect(Cfg) ->
    Candidates = lists:usort(maps:get(seeds, Cfg) ++ dns_nodes(Cfg)),
    ping_all([N || N <- Candidates, not lists:member(N, nodes())]).

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
    _ = [receive {Ref, _} -> ok
         after max(0, Deadline - erlang:monotonic_time(millisecond)) -> timeout
         end || Ref <- Refs],
    ok.

%% One round: a twice/1 call, then the burn calls in parallel, all through
%% the group; the members' `calls' counters before and after tell which node
%% answered how many.
round(#{group := Group, timeout := Timeout} = Cfg, Round) ->
    Before = member_calls(Group),
    io:format("round ~p: group ~p has ~p member(s): ~s~n",
              [Round, Group, map_size(Before), join(maps:keys(Before))]),
    Twice = poolport:call({group, Group}, ?DEMO_MODULE, twice, [Round], Timeout),
    io:format("  twice(~p) = ~s~n", [Round, show(Twice)]),
    Steps = maps:get(steps, Cfg),
    Expected = burn(Steps),
    N = maps:get(calls, Cfg),
    T0 = erlang:monotonic_time(millisecond),
    Results = pmap(fun(_) -> poolport:call({group, Group}, ?DEMO_MODULE, burn, [Steps], Timeout)
                   end, lists:seq(1, N)),
    Ms = erlang:monotonic_time(millisecond) - T0,
    After = member_calls(Group),
    Answered = lists:sort([{Node, Calls - element(1, maps:get(Node, Before, {0, W})), W}
                           || {Node, {Calls, W}} <- maps:to_list(After)]),
    io:format("  ~p x burn(~p) through {group, ~p} in ~p ms (expected result ~p):~n",
              [N, Steps, Group, Ms, Expected]),
    _ = [io:format("    ~s answered ~p call(s) (workers=~p)~n", [Node, C, W])
         || {Node, C, W} <- Answered],
    Bad = [R || R <- [Twice], R =/= {ok, 2 * Round}]
        ++ [R || R <- Results, R =/= {ok, Expected}],
    Nodes = [Node || {Node, C, _} <- Answered, C > 0],
    WorkersStr = join([io_lib:format("~s:~p", [Node, W]) || {Node, C, W} <- Answered, C > 0]),
    case Bad of
        [] ->
            io:format("round ~p ok nodes=~s workers=~s~n", [Round, join(Nodes), WorkersStr]),
            ok;
        _ ->
            io:format("round ~p FAILED (~p bad, first ~0p) nodes=~s workers=~s~n",
                      [Round, length(Bad), hd(Bad), join(Nodes), WorkersStr]),
            error
    end.

%% #{Node => {Calls, Workers}} of the group's members.
member_calls(Group) ->
    #{members := Members} = poolport:info({group, Group}),
    maps:from_list([{Node, {Calls, W}}
                    || #{node := Node, calls := Calls, workers := W} <- Members]).

%% @doc The demo handler's burn/1 computed in Erlang, to check the replies.
-spec burn(non_neg_integer()) -> non_neg_integer().
burn(Steps) ->
    burn(0, Steps, 0).

burn(I, Steps, Acc) when I < Steps -> burn(I + 1, Steps, (Acc * 31 + I) rem 1000003);
burn(_, _, Acc) -> Acc.

pmap(F, Xs) ->
    Self = self(),
    Refs = [begin
                Ref = make_ref(),
                _ = spawn(fun() -> Self ! {Ref, F(X)} end),
                Ref
            end || X <- Xs],
    [receive {Ref, R} -> R end || Ref <- Refs].

show({ok, V}) -> io_lib:format("~0p", [V]);
show(Other) -> io_lib:format("~0p", [Other]).

join(Items) ->
    lists:join(",", [io_lib:format("~s", [I]) || I <- Items]).

config() ->
    #{service => env("POOLPORT_POOL_SERVICE", "pool"),
      node_name => env("POOLPORT_POOL_NODE_NAME", "pool"),
      seeds => [list_to_atom(string:trim(S))
                || S <- string:lexemes(env("POOLPORT_SEED_NODES", ""), ", "),
                   string:trim(S) =/= ""],
      group => list_to_atom(env("POOLPORT_POOL_NAME", "demo")),
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
