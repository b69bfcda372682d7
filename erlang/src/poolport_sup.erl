%% @doc The application's supervisor: the `pg' scope `poolport' of the
%% groups, this node's group load publisher ({@link poolport_group}), then one
%% dynamic child per pool.
%%
%% Pools started with {@link poolport:start/1} and those declared in the
%% application environment (`{pools, [{Name, Opts}]}') live here. Children
%% are `transient': a pool that crashes (for instance because its Python
%% process kept dying) is restarted, one stopped with {@link poolport:stop/1}
%% is removed.
%%
%% The strategy is `one_for_one' with one child specification per pool
%% (not `simple_one_for_one', whose children all share one `shutdown'):
%% each pool's `shutdown' comes from its own `stop_timeout', computed by
%% {@link poolport_os:shutdown_timeout/1} exactly as for
%% {@link poolport:child_spec/1}, so a pool with a long `stop_timeout' is
%% never killed in the middle of its shutdown.
-module(poolport_sup).
-behaviour(supervisor).

%% API.
-export([start_link/0]).
-export([start_pool/1]).
-export([child_spec/1]).
-export([purge/0]).

%% supervisor.
-export([init/1]).

%% API.

%% @doc Start the supervisor, registered as `poolport_sup'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Start a pool from options already checked by
%% {@link poolport_opts:prepare/1}.
-spec start_pool(poolport_opts:cfg()) -> {ok, pid()} | {error, term()}.
start_pool(Cfg) ->
    purge(),
    case supervisor:start_child(?MODULE, child_spec(Cfg)) of
        {ok, Pid} when is_pid(Pid) -> {ok, Pid};
        {ok, Pid, _Info} when is_pid(Pid) -> {ok, Pid};
        {ok, _} -> {error, ignore};
        {ok, _, _} -> {error, ignore};
        %% A failed start comes back as {Reason, ChildRecord}; callers
        %% get the pool's own reason, as before.
        {error, {Reason, Child}} when is_tuple(Child), element(1, Child) =:= child ->
            {error, Reason};
        {error, _} = Error -> Error
    end.

%% @doc The child specification of a pool under `poolport_sup'.
%%
%% A unique id, `transient', and the `shutdown' of
%% {@link poolport_os:shutdown_timeout/1} (the same as
%% {@link poolport:child_spec/1} gives for the same options).
-spec child_spec(poolport_opts:cfg()) -> supervisor:child_spec().
child_spec(Cfg) ->
    #{id => {poolport_server, make_ref()},
      start => {poolport_server, start_link, [Cfg]},
      restart => transient,
      shutdown => poolport_os:shutdown_timeout(Cfg),
      type => worker,
      modules => [poolport_server]}.

%% @doc Forget the pools that have stopped for good (a `transient' child
%% that exited normally keeps its specification under `one_for_one').
%%
%% Called by {@link poolport:stop/1} and {@link start_pool/1}; does nothing
%% if the supervisor is not running.
-spec purge() -> ok.
purge() ->
    try supervisor:which_children(?MODULE) of
        Children ->
            _ = [supervisor:delete_child(?MODULE, Id)
                 || {Id, undefined, _, _} <- Children],
            ok
    catch
        exit:_ -> ok
    end.

%% supervisor.

%% @private
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    SupFlags = #{strategy => one_for_one, intensity => 5, period => 10},
    %% Started before the pools and stopped after them: a pool leaves its
    %% group while the scope is still there.
    Scope = #{id => {pg, poolport_group:scope()},
              start => {pg, start_link, [poolport_group:scope()]},
              restart => permanent, shutdown => 5000, type => worker, modules => [pg]},
    Publisher = #{id => poolport_group,
                  start => {poolport_group, start_link, []},
                  restart => permanent, shutdown => 5000, type => worker,
                  modules => [poolport_group]},
    {ok, {SupFlags, [Scope, Publisher]}}.
