%% @doc Glue of a pool node (deploy/entrypoint.sh pool).
%%
%% Starts the `poolport' application, whose environment (sys.config) lists
%% the pools to start, then keeps every running pool process in the `pg'
%% group `{poolport, PoolName}' of the default scope: the pool's pid is what
%% other nodes call (`poolport:call(Pid, M, F, A)' works across nodes).
%% A pool restarted by its supervisor gets a new pid; the registrar notices
%% within a second and joins it; pg drops dead pids (and all pids of a node
%% that went down) by itself.
%%
%% `health/0' and `info/0' are called remotely by `poolctl' (the container's
%% healthcheck and `poolport-node info').
-module(pool_node).

-export([start/0]).
-export([health/0]).
-export([info/0]).
-export([pools/0]).
-export([group/1]).

%% Internal.
-export([registrar_init/1]).

-define(SCOPE, pg).
-define(REGISTER_EVERY, 1000).

%% @doc Start the poolport pools and the pg registrar; halts the node if the
%% pools cannot start (the container's restart policy takes over).
-spec start() -> ok.
start() ->
    ok = ensure_pg(),
    %% permanent: if the application ever stops (a pool kept crashing past
    %% its supervisor's intensity) the node stops and the container restarts.
    case application:ensure_all_started(poolport, permanent) of
        {ok, _} ->
            Pools = pools(),
            _ = proc_lib:start(?MODULE, registrar_init, [self()]),
            lists:foreach(fun log_pool/1, Pools),
            io:format("pool node ~s up: pools ~p in pg groups ~p~n",
                      [node(), Pools, [group(P) || P <- Pools]]),
            ok;
        {error, Reason} ->
            io:format(standard_error, "pool node ~s: poolport failed to start: ~p~n",
                      [node(), Reason]),
            timer:sleep(500),
            erlang:halt(1)
    end.

%% @doc The names of the pools this node runs (from the app environment).
-spec pools() -> [atom()].
pools() ->
    [Name || {Name, _} <- application:get_env(poolport, pools, [])].

%% @doc The pg group a pool joins.
-spec group(atom()) -> {poolport, atom()}.
group(Pool) ->
    {poolport, Pool}.

%% @doc `ok' if every pool answers `poolport:info/1', runs, knows its worker
%% count and is in its pg group; else `{error, Details}'.
-spec health() -> ok | {error, term()}.
health() ->
    case pools() of
        [] ->
            {error, no_pools};
        Pools ->
            case [{P, R} || P <- Pools, (R = pool_health(P)) =/= ok] of
                [] -> ok;
                Bad -> {error, Bad}
            end
    end.

%% @doc `[{PoolName, poolport:info(PoolName) | {error, Reason}}]'.
-spec info() -> [{atom(), map() | {error, term()}}].
info() ->
    [{P, safe_info(P)} || P <- pools()].

%% Internal.

ensure_pg() ->
    case whereis(?SCOPE) of
        undefined ->
            %% Not started by the kernel (-kernel start_pg true): start it here.
            {ok, _} = pg:start(?SCOPE),
            ok;
        _ ->
            ok
    end.

pool_health(Pool) ->
    case safe_info(Pool) of
        #{status := running, workers := W} = Info when is_integer(W), W > 0 ->
            Pid = whereis(Pool),
            case lists:member(Pid, pg:get_local_members(?SCOPE, group(Pool))) of
                true -> ok;
                false -> {not_in_pg_group, group(Pool), maps:get(workers, Info)}
            end;
        #{status := Status, workers := W} ->
            {not_ready, Status, W};
        {error, _} = Error ->
            Error
    end.

safe_info(Pool) ->
    try poolport:info(Pool)
    catch exit:Reason -> {error, Reason}
    end.

log_pool(Pool) ->
    case safe_info(Pool) of
        #{workers := W, os_pid := OsPid} ->
            io:format("pool ~p: ~p Python workers (poolport serve os pid ~p)~n",
                      [Pool, W, OsPid]);
        Other ->
            io:format("pool ~p: ~p~n", [Pool, Other])
    end.

%% The registrar: joins the current pid of every pool to its group.
registrar_init(Parent) ->
    register(pool_node_registrar, self()),
    _ = register_pools(),
    proc_lib:init_ack(Parent, {ok, self()}),
    registrar_loop().

registrar_loop() ->
    receive
    after ?REGISTER_EVERY ->
        _ = register_pools(),
        registrar_loop()
    end.

register_pools() ->
    [try join(P, whereis(P))
     catch Class:Reason -> {Class, Reason}
     end || P <- pools()].

join(_Pool, undefined) ->
    ok;
join(Pool, Pid) ->
    Group = group(Pool),
    case lists:member(Pid, pg:get_local_members(?SCOPE, Group)) of
        true -> ok;
        false -> pg:join(?SCOPE, Group, Pid)
    end.
