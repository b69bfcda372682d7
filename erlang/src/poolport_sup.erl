%% @doc The application's supervisor: one dynamic child per pool.
%%
%% Pools started with {@link poolport:start/1} and those declared in the
%% application environment (`{pools, [{Name, Opts}]}') live here. Children
%% are `transient': a pool that crashes (for instance because its Python
%% process kept dying) is restarted, one stopped with {@link poolport:stop/1}
%% is removed.
-module(poolport_sup).
-behaviour(supervisor).

%% API.
-export([start_link/0]).
-export([start_pool/1]).

%% supervisor.
-export([init/1]).

%% API.

%% @doc Start the supervisor, registered as `poolport_sup'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Start a pool from options already checked by
%% {@link poolport_server:prepare/1}.
-spec start_pool(poolport_server:cfg()) -> {ok, pid()} | {error, term()}.
start_pool(Cfg) ->
    case supervisor:start_child(?MODULE, [Cfg]) of
        {ok, Pid} when is_pid(Pid) -> {ok, Pid};
        {ok, Pid, _Info} when is_pid(Pid) -> {ok, Pid};
        {ok, _} -> {error, ignore};
        {ok, _, _} -> {error, ignore};
        {error, _} = Error -> Error
    end.

%% supervisor.

%% @private
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    SupFlags = #{strategy => simple_one_for_one, intensity => 5, period => 10},
    Pool = #{id => poolport_server,
             start => {poolport_server, start_link, []},
             restart => transient,
             %% Longer than any pool's bounded stop (see poolport:stop/1).
             shutdown => 60000,
             type => worker,
             modules => [poolport_server]},
    {ok, {SupFlags, [Pool]}}.
