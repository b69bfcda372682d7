%% @doc Probe of a pool node, run on a short-lived hidden node in the same
%% container (deploy/entrypoint.sh health | info).
%%
%%   erl -noshell -hidden -name probeN@IP -run poolctl main health pool@IP
%%
%% `health': exit 0 iff the node answers and every pool answers
%% `poolport:info/1', runs and is a member of its group (the compose
%% healthcheck).
%% `info': print each pool's `poolport:info/1' (one line per pool, first the
%% keys the smoke test reads: `pool=Name node=Node workers=N status=S').
-module(poolctl).

-export([main/1]).

-define(RPC_TIMEOUT, 5000).

-spec main([string()]) -> no_return().
main([Cmd, Target]) ->
    Node = list_to_atom(Target),
    halt_with(run(Cmd, Node));
main(Args) ->
    io:format(standard_error, "usage: poolctl health|info Node (got ~p)~n", [Args]),
    halt_with(2).

run("health", Node) ->
    case rpc:call(Node, pool_node, health, [], ?RPC_TIMEOUT) of
        ok ->
            io:format("healthy: ~s~n", [Node]),
            0;
        Other ->
            io:format("unhealthy: ~s: ~p~n", [Node, Other]),
            1
    end;
run("info", Node) ->
    case rpc:call(Node, pool_node, info, [], ?RPC_TIMEOUT) of
        Pools when is_list(Pools) ->
            lists:foreach(fun(P) -> print_info(Node, P) end, Pools),
            0;
        Other ->
            io:format("error: ~s: ~p~n", [Node, Other]),
            1
    end;
run(Cmd, _Node) ->
    io:format(standard_error, "poolctl: unknown command ~s~n", [Cmd]),
    2.

print_info(Node, {Pool, #{} = Info}) ->
    Rest = maps:without([workers, status, server], Info),
    io:format("pool=~s node=~s workers=~p status=~p ~0p~n",
              [Pool, Node, maps:get(workers, Info, undefined),
               maps:get(status, Info, undefined), Rest]);
print_info(Node, {Pool, Error}) ->
    io:format("pool=~s node=~s error=~0p~n", [Pool, Node, Error]).

halt_with(Code) ->
    %% Let io reach stdout before the VM goes.
    erlang:halt(Code, [{flush, true}]).
