%% @doc Glue of a pool node (deploy/entrypoint.sh pool).
%%
%% Starts the `poolport' application, whose environment (sys.config) lists
%% the pools to start, each with its `group' (`demo' in deploy/sys.config).
%% The application does the rest: a pool joins its group in the `pg' scope
%% `poolport' once its Python side answers, leaves it while Python restarts,
%% and other nodes call the group with `poolport:call({group, demo}, ...)'.
%%
%% `health/0' and `info/0' are called remotely by `poolctl' (the container's
%% healthcheck and `poolport-node info').
-module(pool_node).

-export([start/0]).
-export([health/0]).
-export([info/0]).
-export([pools/0]).

%% @doc Start the poolport application and its pools; halts the node if the
%% pools cannot start (the container's restart policy takes over).
-spec start() -> ok.
start() ->
    %% permanent: if the application ever stops (a pool kept crashing past
    %% its supervisor's intensity) the node stops and the container restarts.
    case application:ensure_all_started(poolport, permanent) of
        {ok, _} ->
            Pools = pools(),
            lists:foreach(fun log_pool/1, Pools),
            io:format("pool node ~s up: pools ~p in groups ~p~n",
                      [node(), [P || {P, _} <- Pools], [G || {_, G} <- Pools]]),
            ok;
        {error, Reason} ->
            io:format(standard_error, "pool node ~s: poolport failed to start: ~p~n",
                      [node(), Reason]),
            timer:sleep(500),
            erlang:halt(1)
    end.

%% @doc The pools this node runs and their groups (from the app environment).
-spec pools() -> [{atom(), atom() | undefined}].
pools() ->
    [{Name, group(Opts)} || {Name, Opts} <- application:get_env(poolport, pools, [])].

%% @doc `ok' if every pool answers `poolport:info/1', runs, knows its worker
%% count and is a member of its group; else `{error, Details}'.
-spec health() -> ok | {error, term()}.
health() ->
    case pools() of
        [] ->
            {error, no_pools};
        Pools ->
            case [{P, R} || {P, G} <- Pools, (R = pool_health(P, G)) =/= ok] of
                [] -> ok;
                Bad -> {error, Bad}
            end
    end.

%% @doc `[{PoolName, poolport:info(PoolName) | {error, Reason}}]'.
-spec info() -> [{atom(), map() | {error, term()}}].
info() ->
    [{P, safe_info(P)} || {P, _} <- pools()].

%% Internal.

group(Opts) when is_map(Opts) -> maps:get(group, Opts, undefined);
group(Opts) when is_list(Opts) -> proplists:get_value(group, Opts).

pool_health(Pool, Group) ->
    case safe_info(Pool) of
        #{status := running, workers := W} when is_integer(W), W > 0, Group =:= undefined ->
            ok;
        #{status := running, workers := W} when is_integer(W), W > 0 ->
            case lists:member(whereis(Pool), poolport:members(Group)) of
                true -> ok;
                false -> {not_in_group, Group}
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

log_pool({Pool, Group}) ->
    case safe_info(Pool) of
        #{workers := W, os_pid := OsPid} ->
            io:format("pool ~p (group ~p): ~p Python workers (poolport serve os pid ~p)~n",
                      [Pool, Group, W, OsPid]);
        Other ->
            io:format("pool ~p: ~p~n", [Pool, Other])
    end.
