%% @doc Pool options: checked and normalised without side effects
%% ({@link check_opts/1}), then resolved against the system
%% ({@link prepare/1}: the interpreter in `PATH', the config file), and
%% turned into the command line of `python -m poolport'.
%%
%% Pure but for {@link prepare/1} and {@link default_python/0}; the
%% option table itself is documented in {@link poolport:opts()}.
-module(poolport_opts).

-export([prepare/1]).
-export([check_opts/1]).
-export([default_python/0]).
-export([default_timeout/0]).
-export([port_args/1]).
-export([command_args/3]).
-export([port_settings/1]).

-type cfg() :: #{
    config := string() | {priv, atom(), string()} | undefined,
    python := string(),
    name := atom() | undefined,
    packet := 1 | 2 | 4,
    args := [string()],
    env := [{string(), string() | false}],
    cd := string() | undefined,
    max_restarts := non_neg_integer(),
    restart_period := pos_integer(),
    start_timeout := pos_integer(),
    stop_timeout := non_neg_integer(),
    group := atom() | undefined,
    events := module() | undefined,
    callbacks := [module() | {module(), atom()}],
    %% Set by prepare/1: the default call timeout when the pool started.
    caller_timeout => timeout()
}.
%% Validated, normalised options (see {@link poolport:opts()}).

-export_type([cfg/0]).

%% @doc Check options and resolve the interpreter and the config path.
%%
%% Impure: looks up `python' in `PATH' and checks that the config file
%% exists.
-spec prepare(poolport:opts() | [{atom(), term()}]) -> {ok, cfg()} | {error, term()}.
prepare(Opts) ->
    case check_opts(Opts) of
        {ok, Cfg} -> resolve(Cfg#{caller_timeout => default_timeout()});
        {error, _} = Error -> Error
    end.

%% @doc The timeout of `poolport:call/4': the application environment's
%% `default_timeout' (ms or `infinity'), else 5000.
-spec default_timeout() -> timeout().
default_timeout() ->
    application:get_env(poolport, default_timeout, 5000).

%% @doc Check options and fill in defaults, without touching the system.
%%
%% Accepts a map or a proplist (handy in `sys.config'). Unknown keys and
%% bad values give `{error, {unknown_option, Key}}' and
%% `{error, {bad_option, Key, Value}}'.
-spec check_opts(poolport:opts() | [{atom(), term()}]) -> {ok, cfg()} | {error, term()}.
check_opts(Opts) when is_list(Opts) ->
    try maps:from_list(Opts) of
        Map -> check_opts(Map)
    catch
        error:badarg -> {error, {bad_options, Opts}}
    end;
check_opts(Opts) when is_map(Opts) ->
    Defaults = #{
        config => "config/poolport.yaml",
        python => default_python(),
        name => undefined,
        packet => 4,
        args => [],
        env => [],
        cd => undefined,
        max_restarts => 5,
        restart_period => 10,
        start_timeout => 15000,
        stop_timeout => 10000,
        group => undefined,
        events => undefined,
        callbacks => []
    },
    case [K || K <- maps:keys(Opts), not maps:is_key(K, Defaults)] of
        [Key | _] ->
            {error, {unknown_option, Key}};
        [] ->
            check_each(maps:to_list(maps:merge(Defaults, Opts)), #{})
    end;
check_opts(Opts) ->
    {error, {bad_options, Opts}}.

%% @doc The interpreter of a pool whose options name none: the application
%% environment's `python', else `$POOLPORT_PYTHON' (what `scripts/erl' and the
%% tests set to the checkout's virtualenv), else `python3' from `PATH'.
-spec default_python() -> string().
default_python() ->
    case application:get_env(poolport, python) of
        {ok, Python} -> Python;
        undefined ->
            case os:getenv("POOLPORT_PYTHON") of
                Env when Env =:= false; Env =:= "" -> "python3";
                Env -> Env
            end
    end.

-spec check_each([{atom(), term()}], map()) -> {ok, cfg()} | {error, term()}.
check_each([], Acc) ->
    {ok, Acc};
check_each([{Key, Value} | Rest], Acc) ->
    case check_opt(Key, Value) of
        {ok, Normal} -> check_each(Rest, Acc#{Key => Normal});
        error -> {error, {bad_option, Key, Value}}
    end.

-spec check_opt(atom(), term()) -> {ok, term()} | error.
check_opt(config, undefined) -> {ok, undefined};
check_opt(config, {priv, App, Path}) when is_atom(App) ->
    case nonempty(to_string(Path)) of
        {ok, Rel} -> {ok, {priv, App, Rel}};
        error -> error
    end;
check_opt(config, Path) -> to_string(Path);
check_opt(python, Path) -> nonempty(to_string(Path));
check_opt(name, Name) when is_atom(Name) -> {ok, Name};
check_opt(packet, N) when N =:= 1; N =:= 2; N =:= 4 -> {ok, N};
check_opt(args, Args) when is_list(Args) -> all(fun to_string/1, Args);
check_opt(env, Env) when is_list(Env) -> all(fun env_var/1, Env);
check_opt(cd, undefined) -> {ok, undefined};
check_opt(cd, Dir) -> nonempty(to_string(Dir));
check_opt(max_restarts, N) when is_integer(N), N >= 0 -> {ok, N};
check_opt(restart_period, N) when is_integer(N), N > 0 -> {ok, N};
check_opt(start_timeout, N) when is_integer(N), N > 0 -> {ok, N};
check_opt(stop_timeout, N) when is_integer(N), N >= 0 -> {ok, N};
check_opt(group, Group) when is_atom(Group) -> {ok, Group};
check_opt(events, Module) when is_atom(Module) -> {ok, Module};
check_opt(callbacks, List) when is_list(List) ->
    case lists:all(fun(M) when is_atom(M) -> true;
                      ({M, F}) -> is_atom(M) andalso is_atom(F);
                      (_) -> false
                   end, List) of
        true -> {ok, List};
        false -> error
    end;
check_opt(_, _) -> error.

-spec env_var(term()) -> {ok, {string(), string() | false}} | error.
env_var({Name, false}) ->
    case nonempty(to_string(Name)) of
        {ok, N} -> {ok, {N, false}};
        error -> error
    end;
env_var({Name, Value}) ->
    case {nonempty(to_string(Name)), to_string(Value)} of
        {{ok, N}, {ok, V}} -> {ok, {N, V}};
        _ -> error
    end;
env_var(_) ->
    error.

-spec to_string(term()) -> {ok, string()} | error.
to_string(Bin) when is_binary(Bin) ->
    case unicode:characters_to_list(Bin) of
        List when is_list(List) -> {ok, List};
        _ -> error
    end;
to_string(Atom) when is_atom(Atom), Atom =/= undefined ->
    {ok, atom_to_list(Atom)};
to_string(List) when is_list(List) ->
    try unicode:characters_to_list(List) of
        Chars when is_list(Chars) -> {ok, Chars};
        _ -> error
    catch
        error:_ -> error
    end;
to_string(_) ->
    error.

-spec nonempty({ok, string()} | error) -> {ok, string()} | error.
nonempty({ok, [_ | _]} = Ok) -> Ok;
nonempty(_) -> error.

-spec all(fun((term()) -> {ok, T} | error), list()) -> {ok, [T]} | error.
all(Fun, List) ->
    try
        {ok, [case Fun(X) of {ok, Y} -> Y; error -> throw(error) end || X <- List]}
    catch
        throw:error -> error
    end.

-spec resolve(cfg()) -> {ok, cfg()} | {error, term()}.
resolve(#{python := Python, config := Config} = Cfg) ->
    case find_python(Python) of
        false ->
            {error, {python_not_found, Python}};
        Exe ->
            case config_path(Config) of
                undefined ->
                    {ok, Cfg#{python := Exe}};
                {error, _} = Error ->
                    Error;
                Abs ->
                    case filelib:is_regular(Abs) of
                        true -> {ok, Cfg#{python := Exe, config := Abs}};
                        false -> {error, {config_not_found, Abs}}
                    end
            end
    end.

%% The absolute path of the config option: `{priv, App, Path}' is `Path' in
%% the priv directory of the application `App' (so a release ships its YAML,
%% and the handlers its `python_path' names, there).
-spec config_path(undefined | string() | {priv, atom(), string()}) ->
          undefined | string() | {error, {config_not_found, {priv, atom(), string()}}}.
config_path(undefined) ->
    undefined;
config_path({priv, App, Path} = Priv) ->
    case code:priv_dir(App) of
        {error, bad_name} -> {error, {config_not_found, Priv}};
        Dir -> filename:join(Dir, Path)
    end;
config_path(Path) ->
    filename:absname(Path).

-spec find_python(string()) -> string() | false.
find_python(Python) ->
    case lists:member($/, Python) of
        true ->
            Abs = filename:absname(Python),
            case filelib:is_regular(Abs) of
                true -> Abs;
                false -> false
            end;
        false ->
            os:find_executable(Python)
    end.

%% Command line arguments after the interpreter. `--reply-tags' is always
%% there: the server relies on tagged replies (see the module doc).
-spec port_args(cfg()) -> [string()].
port_args(Cfg) ->
    command_args("serve", [], Cfg).

%% The same options for another `poolport' command (`check' takes every
%% option `serve' takes).
-spec command_args(string(), [string()], cfg()) -> [string()].
command_args(Command, Extra, #{config := Config, packet := Packet, args := Args} = Cfg) ->
    ConfigArgs = case Config of
                     undefined -> [];
                     _ -> ["--config", Config]
                 end,
    NameArgs = case Cfg of
                   #{name := Name} when is_atom(Name), Name =/= undefined -> ["--name", atom_to_list(Name)];
                   _ -> []
               end,
    %% Calls with the default timeout then need no {info, timeout, _} packet.
    CallerArgs = case Cfg of
                     #{caller_timeout := Ms} when is_integer(Ms), Ms > 0 ->
                         ["--caller-timeout-ms", integer_to_list(Ms)];
                     _ -> []
                 end,
    ["-m", "poolport", Command] ++ ConfigArgs
        ++ ["--packet", integer_to_list(Packet), "--reply-tags"] ++ CallerArgs ++ NameArgs ++ Extra ++ Args.

%% open_port/2 settings. stderr is not redirected: Python logs go to the
%% node's stderr, stdout carries frames only.
-spec port_settings(cfg()) -> list().
port_settings(#{packet := Packet, env := Env, cd := Cd} = Cfg) ->
    [{args, port_args(Cfg)}, {packet, Packet}, binary, exit_status, use_stdio, hide]
        ++ [{env, Env} || Env =/= []]
        ++ [{cd, Cd} || Cd =/= undefined].

-ifdef(TEST).
-include_lib("eunit/include/eunit.hrl").

cfg(Opts) ->
    {ok, Cfg} = check_opts(Opts),
    Cfg.

check_opts_defaults_test() ->
    {ok, Cfg} = check_opts(#{}),
    ?assertMatch(#{config := "config/poolport.yaml", packet := 4, args := [], env := [],
                   cd := undefined, name := undefined, max_restarts := 5,
                   restart_period := 10}, Cfg),
    ?assert(is_list(maps:get(python, Cfg))).

default_python_test_() ->
    {setup,
     fun() -> {os:getenv("POOLPORT_PYTHON"), application:get_env(poolport, python)} end,
     fun({Env, App}) ->
             _ = case Env of false -> os:unsetenv("POOLPORT_PYTHON"); _ -> os:putenv("POOLPORT_PYTHON", Env) end,
             case App of undefined -> application:unset_env(poolport, python); {ok, P} -> application:set_env(poolport, python, P) end
     end,
     fun(_) ->
             application:unset_env(poolport, python),
             os:unsetenv("POOLPORT_PYTHON"),
             Bare = default_python(),
             os:putenv("POOLPORT_PYTHON", "/venv/bin/python"),
             FromEnv = default_python(),
             application:set_env(poolport, python, "/app/env/python"),
             FromApp = default_python(),
             [?_assertEqual("python3", Bare),
              ?_assertEqual("/venv/bin/python", FromEnv),
              ?_assertEqual("/app/env/python", FromApp)]
     end}.

check_opts_normalises_test() ->
    {ok, Cfg} = check_opts([{config, <<"c.yaml">>}, {python, <<"/usr/bin/python3">>},
                            {args, [<<"--log-level">>, "debug", verbose]},
                            {env, [{<<"A">>, <<"1">>}, {"B", false}]}, {packet, 2},
                            {name, p}]),
    ?assertMatch(#{config := "c.yaml", python := "/usr/bin/python3",
                   args := ["--log-level", "debug", "verbose"],
                   env := [{"A", "1"}, {"B", false}], packet := 2, name := p}, Cfg).

check_opts_errors_test_() ->
    [?_assertEqual({error, {unknown_option, bogus}}, check_opts(#{bogus => 1})),
     ?_assertEqual({error, {bad_option, packet, 3}}, check_opts(#{packet => 3})),
     ?_assertEqual({error, {bad_option, args, "x"}}, check_opts(#{args => "x"})),
     ?_assertEqual({error, {bad_option, args, [1.5]}}, check_opts(#{args => [1.5]})),
     ?_assertEqual({error, {bad_option, env, [{"A", 1}]}}, check_opts(#{env => [{"A", 1}]})),
     ?_assertEqual({error, {bad_option, python, ""}}, check_opts(#{python => ""})),
     ?_assertEqual({error, {bad_option, name, "n"}}, check_opts(#{name => "n"})),
     ?_assertEqual({error, {bad_option, max_restarts, -1}}, check_opts(#{max_restarts => -1})),
     ?_assertEqual({error, {bad_option, restart_period, 0}}, check_opts(#{restart_period => 0})),
     ?_assertEqual({error, {bad_options, 42}}, check_opts(42)),
     ?_assertEqual({error, {bad_options, [x]}}, check_opts([x]))].

resolve_test_() ->
    [?_assertEqual({error, {python_not_found, "no-such-python-poolport"}},
                   prepare(#{python => "no-such-python-poolport"})),
     ?_assertMatch({error, {config_not_found, "/" ++ _}},
                   prepare(#{python => "sh", config => "no/such/file.yaml"})),
     ?_assertMatch({ok, #{python := "/" ++ _, config := undefined}},
                   prepare(#{python => "sh", config => undefined})),
     ?_assertEqual({ok, filename:join(code:priv_dir(poolport), "demo.yaml")},
                   maps:find(config, element(2, prepare(#{python => "sh",
                                                           config => {priv, poolport, <<"demo.yaml">>}})))),
     ?_assertEqual({error, {config_not_found, {priv, no_such_app_poolport, "x.yaml"}}},
                   prepare(#{python => "sh", config => {priv, no_such_app_poolport, "x.yaml"}})),
     ?_assertEqual({error, {bad_option, config, {priv, "app", "x.yaml"}}},
                   check_opts(#{config => {priv, "app", "x.yaml"}}))].

port_args_test_() ->
    [?_assertEqual(["-m", "poolport", "serve", "--config", "/c.yaml", "--packet", "4",
                    "--reply-tags"],
                   port_args(cfg(#{config => "/c.yaml"}))),
     ?_assertEqual(["-m", "poolport", "serve", "--packet", "2", "--reply-tags",
                    "--log-level", "debug"],
                   port_args(cfg(#{config => undefined, packet => 2,
                                   args => ["--log-level", "debug"]})))].

check_args_test() ->
    ?assertEqual(["-m", "poolport", "check", "--config", "/c.yaml", "--packet", "4",
                  "--reply-tags", "--init", "--log-level", "debug"],
                 command_args("check", ["--init"], cfg(#{config => "/c.yaml",
                                                          args => ["--log-level", "debug"]}))),
    %% A named pool's Python logs carry its name.
    ?assertEqual(["-m", "poolport", "serve", "--packet", "4", "--reply-tags", "--name", "my_pool"],
                 port_args(cfg(#{config => undefined, name => my_pool}))),
    %% The default call timeout is Python's caller timeout; infinity or 0 is none.
    Cfg = cfg(#{config => undefined}),
    ?assertEqual(["-m", "poolport", "serve", "--packet", "4", "--reply-tags",
                  "--caller-timeout-ms", "5000"],
                 port_args(Cfg#{caller_timeout => 5000})),
    [?assertEqual(["-m", "poolport", "serve", "--packet", "4", "--reply-tags"],
                  port_args(Cfg#{caller_timeout => T})) || T <- [infinity, 0]],
    ?assertMatch({ok, #{caller_timeout := 5000}}, prepare(#{python => "sh", config => undefined})).

port_settings_test() ->
    Settings = port_settings(cfg(#{packet => 2, env => [{"X", "1"}], cd => "/tmp"})),
    ?assert(lists:member({packet, 2}, Settings)),
    ?assert(lists:member(binary, Settings)),
    ?assert(lists:member(exit_status, Settings)),
    ?assert(lists:member({env, [{"X", "1"}]}, Settings)),
    ?assert(lists:member({cd, "/tmp"}, Settings)),
    ?assertNot(lists:member(stderr_to_stdout, Settings)),
    ?assertNot(lists:keymember(cd, 1, port_settings(cfg(#{})))).

-endif.
