%% End-to-end tests of the live operations: reload/1,2, resize/2,
%% reload_config/1,2 and the statistics of info/1, through a real
%% `python -m poolport serve'.
%%
%% Each test writes its own handler module and YAML to a fresh directory,
%% so it can edit them while the pool serves. Load comes from 50 processes
%% calling in a loop; every result they get is checked, and none may be an
%% error. Nothing is timed: timeouts only catch deadlocks.
-module(poolport_ops_tests).

-include_lib("eunit/include/eunit.hrl").

-define(E2E, poolport_e2e_tests).
-define(M, pp_reload).
-define(DEADLOCK, 60000).
-define(LOADERS, 50).

ops_test_() ->
    [{Title, {timeout, 240, Test}} || {Title, Test} <- [
        {"reload under load from 50 processes: no error, the new code after", fun reload_under_load/0},
        {"reload of a broken module: {reload_failed, Traceback}, the old code serves",
         fun reload_broken/0},
        {"reload with a failing worker_init: the old workers serve", fun reload_failing_init/0},
        {"resize up and down under load: no error, info/1 shows it at once",
         fun resize_under_load/0},
        {"per-function statistics: exact counts of calls, errors, timeouts, crashes",
         fun stats_exact/0},
        {"reload_config: live keys applied, others reported", fun reload_config/0},
        {"operations: bad arguments, a stopped pool", fun bad_use/0}
    ]].

%% The handler module, version V. `work' answers its version after Ms ms.
handler(V) ->
    io_lib:format(
      "import os, time~n"
      "VERSION = ~b~n"
      "def version():~n    return VERSION~n"
      "def work(ms):~n    time.sleep(ms / 1000)~n    return VERSION~n"
      "def echo(x):~n    return x~n"
      "def fail():~n    raise ValueError('no')~n"
      "def crash():~n    os._exit(1)~n"
      "def init():~n    if os.environ.get('PP_RELOAD_INIT_FAILS') or os.path.exists(~p):~n"
      "        raise RuntimeError('init refuses')~n",
      [V, "init_fails"]).

%% A directory with pp_reload.py (version 1) and pool.yaml.
setup_dir(Yaml) ->
    Dir = filename:join(tmp_dir(), lists:concat(["pp_ops_", os:getpid(), "_",
                                                 erlang:unique_integer([positive])])),
    _ = file:del_dir_r(Dir),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    write_handler(Dir, 1),
    ok = file:write_file(filename:join(Dir, "pool.yaml"),
                         ["modules: [pp_reload]\npython_path: [\".\"]\nlog_level: WARNING\n", Yaml]),
    Dir.

%% Each version has another size, so Python never mistakes a new file for
%% its cached bytecode (which it checks by mtime in seconds and size).
write_handler(Dir, V) ->
    ok = file:write_file(filename:join(Dir, "pp_reload.py"),
                         [handler(V), lists:duplicate(V, $#), "\n"]).

tmp_dir() ->
    case os:getenv("TMPDIR") of
        Tmp when Tmp =:= false; Tmp =:= "" -> "/tmp";
        Tmp -> Tmp
    end.

stop(Pool, Dir) ->
    ok = poolport:stop(Pool),
    ok = file:del_dir_r(Dir).

%% Python's worker processes, those being retired included.
processes(Pool) ->
    {ok, #{processes := N}} = poolport_server:sys_call(Pool, stats, [], ?DEADLOCK),
    N.

%% A pool whose workers are all up (start_link/1 returns once one is).
start(Dir, Extra) ->
    {ok, Pool} = poolport:start_link(?E2E:opts(maps:merge(#{config => filename:join(Dir, "pool.yaml"),
                                                             cd => Dir}, Extra))),
    unlink(Pool),
    ?E2E:wait_until(fun() ->
                        {ok, #{ready := Ready, workers := N}} =
                            poolport_server:sys_call(Pool, stats, [], ?DEADLOCK),
                        Ready =:= N
                    end, ?DEADLOCK),
    Pool.

%% ?LOADERS processes calling `work' until told to stop; each reports every
%% result it got.
start_load(Pool, Ms) ->
    Self = self(),
    [spawn(fun() -> load_loop(Self, Pool, Ms, []) end) || _ <- lists:seq(1, ?LOADERS)].

load_loop(Parent, Pool, Ms, Acc) ->
    receive
        {stop, Ref} -> Parent ! {Ref, self(), lists:reverse(Acc)}
    after 0 ->
        case catch poolport:call(Pool, ?M, work, [Ms], ?DEADLOCK) of
            {'EXIT', _} -> ok;  % the pool is gone: a failed test stopped it
            {error, noproc} -> ok;
            R -> load_loop(Parent, Pool, Ms, [R | Acc])
        end
    end.

stop_load(Loaders) ->
    Ref = make_ref(),
    [L ! {stop, Ref} || L <- Loaders],
    lists:append([receive {Ref, L, Results} -> Results after ?DEADLOCK -> error(deadlock) end
                  || L <- Loaders]).

%% Wait until every loader made at least one more call.
some_calls(Pool, N) ->
    #{calls := C0} = poolport:info(Pool),
    ?E2E:wait_until(fun() -> maps:get(calls, poolport:info(Pool)) >= C0 + N end, ?DEADLOCK).

reload_under_load() ->
    Dir = setup_dir("workers: 3\n"),
    Pool = start(Dir, #{}),
    try
        ?assertEqual({ok, 1}, poolport:call(Pool, ?M, version, [])),
        Loaders = start_load(Pool, 2),
        some_calls(Pool, 200),
        write_handler(Dir, 2),
        ?assertEqual(ok, poolport:reload(Pool)),
        %% Every call from now on runs version 2.
        After = ?E2E:pmap(fun(_) -> poolport:call(Pool, ?M, version, []) end, lists:seq(1, 60), ?DEADLOCK),
        ?assertEqual(lists:duplicate(60, {ok, 2}), After),
        some_calls(Pool, 200),
        Results = stop_load(Loaders),
        ?assertEqual([], [R || R <- Results, R =/= {ok, 1}, R =/= {ok, 2}]),
        ?assert(lists:member({ok, 2}, Results)),
        %% A second reload, back to back with a third: both done.
        write_handler(Dir, 3),
        Self = self(),
        _ = [spawn_link(fun() -> Self ! {reloaded, poolport:reload(Pool)} end) || _ <- [1, 2]],
        [receive {reloaded, R} -> ?assertEqual(ok, R) after ?DEADLOCK -> error(deadlock) end
         || _ <- [1, 2]],
        ?assertEqual({ok, 3}, poolport:call(Pool, ?M, version, [])),
        Info = poolport:info(Pool),
        ?assertMatch(#{workers := 3, errors := 0, restarts := 0,
                       worker_restarts := #{reload := R, crash := 0}} when R >= 6, Info),
        ?assert(maps:get(reloads, Info) >= 2)
    after
        stop(Pool, Dir)
    end.

reload_broken() ->
    Dir = setup_dir("workers: 2\n"),
    Pool = start(Dir, #{}),
    try
        Loaders = start_load(Pool, 1),
        some_calls(Pool, 100),
        ok = file:write_file(filename:join(Dir, "pp_reload.py"), "def version(:\n    return 2\n"),
        {error, {reload_failed, Text}} = poolport:reload(Pool),
        ?assertNotEqual(nomatch, binary:match(Text, <<"SyntaxError">>)),
        ?assertNotEqual(nomatch, binary:match(Text, <<"pp_reload.py">>)),
        ?assertNotEqual(nomatch, binary:match(Text, <<"Traceback">>)),
        %% The old workers serve the old code, and go on doing so.
        ?assertEqual(lists:duplicate(40, {ok, 1}),
                     ?E2E:pmap(fun(_) -> poolport:call(Pool, ?M, version, []) end, lists:seq(1, 40), ?DEADLOCK)),
        some_calls(Pool, 100),
        Results = stop_load(Loaders),
        ?assertEqual([], [R || R <- Results, R =/= {ok, 1}]),
        ?assertMatch(#{worker_restarts := #{reload := 0}, workers := 2}, poolport:info(Pool)),
        %% Fixed: the next reload goes through.
        write_handler(Dir, 4),
        ?assertEqual(ok, poolport:reload(Pool)),
        ?assertEqual({ok, 4}, poolport:call(Pool, ?M, version, []))
    after
        stop(Pool, Dir)
    end.

reload_failing_init() ->
    Dir = setup_dir("workers: 2\nworker_init: \"pp_reload:init\"\n"),
    Pool = start(Dir, #{}),
    try
        ok = file:write_file(filename:join(Dir, "init_fails"), <<>>),
        write_handler(Dir, 5),
        {error, {reload_failed, Text}} = poolport:reload(Pool),
        ?assertNotEqual(nomatch, binary:match(Text, <<"init refuses">>)),
        ?assertNotEqual(nomatch, binary:match(Text, <<"worker_init">>)),
        ?assertEqual({ok, 1}, poolport:call(Pool, ?M, version, [])),
        ?assertMatch(#{workers := 2, restarts := 0}, poolport:info(Pool))
    after
        stop(Pool, Dir)
    end.

resize_under_load() ->
    Dir = setup_dir("workers: 2\n"),
    Pool = start(Dir, #{}),
    try
        Loaders = start_load(Pool, 3),
        some_calls(Pool, 100),
        Steps = [4, 1, 3, 1, 2],
        lists:foreach(fun(N) ->
                          ?assertEqual(ok, poolport:resize(Pool, N)),
                          ?assertMatch(#{workers := N}, poolport:info(Pool)),
                          some_calls(Pool, 100)
                      end, Steps),
        Results = stop_load(Loaders),
        ?assertEqual([], [R || R <- Results, R =/= {ok, 1}]),
        %% The retired workers end once they have answered what they had.
        ok = poolport:resize(Pool, 4),
        ?E2E:wait_until(fun() -> processes(Pool) =:= 4 end, ?DEADLOCK),
        ?assertEqual(lists:duplicate(40, {ok, 1}),
                     ?E2E:pmap(fun(_) -> poolport:call(Pool, ?M, work, [20]) end, lists:seq(1, 40), ?DEADLOCK)),
        ?assertMatch(#{workers := 4, errors := 0, restarts := 0,
                       worker_restarts := #{crash := 0, timeout := 0}}, poolport:info(Pool))
    after
        stop(Pool, Dir)
    end.

stats_exact() ->
    Dir = setup_dir("workers: 2\n"),
    Pool = start(Dir, #{}),
    try
        Echoes = ?E2E:pmap(fun(I) -> poolport:call(Pool, ?M, echo, [I]) end, lists:seq(1, 500), ?DEADLOCK),
        ?assertEqual([{ok, I} || I <- lists:seq(1, 500)], Echoes),
        Fails = ?E2E:pmap(fun(_) -> poolport:call(Pool, ?M, fail, []) end, lists:seq(1, 7), ?DEADLOCK),
        [?assertMatch({error, {user, 0, <<"ValueError">>, _, _}}, R) || R <- Fails],
        ok = poolport:cast(Pool, ?M, echo, [cast]),
        ?assertEqual({error, timeout}, poolport:call(Pool, ?M, work, [30000], 300)),
        ?assertMatch({error, {server, 4, <<"WorkerCrashed">>, _, _}},
                     poolport:call(Pool, ?M, crash, [])),
        ?assertEqual({ok, 1}, poolport:call(Pool, ?M, work, [9])),
        #{functions := F, worker_restarts := Restarts, queue_depth := Depth,
          queue_wait := #{p50_us := _, p99_us := _, max_us := _}, stats_age_ms := Age}
            = poolport:info(Pool),
        ?assertMatch(#{calls := 501, errors := 0, timeouts := 0, crashes := 0},
                     maps:get({?M, echo}, F)),
        ?assertMatch(#{calls := 7, errors := 7, timeouts := 0, crashes := 0},
                     maps:get({?M, fail}, F)),
        ?assertMatch(#{calls := 2, errors := 0, timeouts := 1, crashes := 0},
                     maps:get({?M, work}, F)),
        ?assertMatch(#{calls := 1, errors := 0, timeouts := 0, crashes := 1},
                     maps:get({?M, crash}, F)),
        %% Latency: the 9 ms call is in its bucket; nothing beats the maximum.
        #{p50_us := P50, p99_us := P99, max_us := Max} = maps:get({?M, work}, F),
        ?assert(Max >= 9000),
        ?assert(P50 =< P99 andalso P99 =< Max),
        ?assertEqual(#{crash => 1, timeout => 1, memory => 0, reload => 0}, Restarts),
        ?assertEqual(0, Depth),
        ?assert(is_integer(Age) andalso Age >= 0)
    after
        stop(Pool, Dir)
    end.

reload_config() ->
    Dir = setup_dir("workers: 2\ntimeout_ms: 0\n"),
    Pool = start(Dir, #{}),
    Yaml = filename:join(Dir, "pool.yaml"),
    try
        ?assertEqual({ok, #{applied => [], needs_restart => []}}, poolport:reload_config(Pool)),
        ok = file:write_file(Yaml, "modules: [pp_reload, other]\npython_path: [\".\"]\n"
                                   "log_level: WARNING\nworkers: 3\ntimeout_ms: 200\n"),
        {ok, #{applied := Applied, needs_restart := Restart}} = poolport:reload_config(Pool),
        ?assertEqual([timeout_ms, workers], lists:sort(Applied)),
        ?assertEqual([modules], Restart),
        ?assertMatch(#{workers := 3}, poolport:info(Pool)),
        %% The new global timeout applies to every worker.
        ?assertEqual({error, timeout}, poolport:call(Pool, ?M, work, [5000], 60000)),
        %% A file that does not validate changes nothing.
        ok = file:write_file(Yaml, "workers: two\n"),
        {error, {config, Text}} = poolport:reload_config(Pool),
        ?assertNotEqual(nomatch, binary:match(Text, <<"workers: expected an integer">>)),
        ?assertMatch(#{workers := 3}, poolport:info(Pool))
    after
        stop(Pool, Dir)
    end.

bad_use() ->
    Dir = setup_dir("workers: 1\n"),
    Pool = start(Dir, #{}),
    ?assertError(badarg, poolport:resize(Pool, 0)),
    ?assertError(badarg, poolport:resize(Pool, two)),
    ?assertError(badarg, poolport:reload(Pool, -1)),
    %% A raw request with bad arguments is an error reply, not a crash.
    ?assertMatch({error, {protocol, 2, <<"BadRequest">>, _, _}},
                 poolport_server:sys_call(Pool, resize, [0], 5000)),
    ?assertMatch({ok, unknown}, poolport_server:sys_call(Pool, reload_status, [99], 5000)),
    ?assertEqual({ok, 1}, poolport:call(Pool, ?M, version, [])),
    ok = stop(Pool, Dir),
    ?assertEqual({error, noproc}, poolport:reload(Pool)),
    ?assertEqual({error, noproc}, poolport:resize(Pool, 2)).
