%% @doc The `poolport' application: starts {@link poolport_sup} and the
%% pools declared in the application environment.
%%
%% ```
%% %% sys.config
%% [{poolport, [{default_timeout, 5000},
%%              {pools, [{my_pool, #{config => "config/poolport.yaml",
%%                                   python => "/opt/venv/bin/python",
%%                                   group => my_group}}]}]}].
%% '''
%% Each pool is registered under its name (and, with `group', is a member of
%% that group: see {@link poolport_group}). If one cannot start, the
%% application does not start either. The supervisor also runs the `pg' scope
%% `poolport' and the group load publisher, so a node that only calls groups
%% starts the application with no pools.
-module(poolport_app).
-behaviour(application).

%% application.
-export([start/2]).
-export([stop/1]).

%% application.

%% @private
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    case poolport_sup:start_link() of
        {ok, Sup} ->
            case start_pools(application:get_env(poolport, pools, [])) of
                ok ->
                    {ok, Sup};
                {error, _} = Error ->
                    unlink(Sup),
                    exit(Sup, shutdown),
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% @private
-spec stop(term()) -> ok.
stop(_State) ->
    ok.

%% Internal.

-spec start_pools(term()) -> ok | {error, term()}.
start_pools([]) ->
    ok;
start_pools([{Name, Opts} | Rest]) when is_atom(Name), (is_map(Opts) orelse is_list(Opts)) ->
    Started = case poolport_opts:check_opts(Opts) of
                  {ok, _} ->
                      OptsMap = case is_map(Opts) of
                                    true -> Opts;
                                    false -> maps:from_list(Opts)
                                end,
                      case poolport_opts:prepare(OptsMap#{name => Name}) of
                          {ok, Cfg} -> poolport_sup:start_pool(Cfg);
                          {error, _} = Error -> Error
                      end;
                  {error, _} = Error ->
                      Error
              end,
    case Started of
        {ok, _} -> start_pools(Rest);
        {error, Reason} -> {error, {pool_start_failed, Name, Reason}}
    end;
start_pools(Pools) ->
    {error, {bad_pools, Pools}}.
