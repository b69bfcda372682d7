%% End-to-end tests: a real `python -m poolport serve' behind the port.
%%
%% The interpreter is $POOLPORT_PYTHON (default python3). If the repository's
%% Python package sits next to erlang/, it is put first on PYTHONPATH, so the
%% tests also run from a plain checkout; in CI it is pip-installed.
%% Handlers: test/fixtures/pp_handlers.py, config: test/fixtures/poolport_test.yaml.
%% The misalignment tests run test/fixtures/fake_tagged_serve.py instead (through
%% a shell wrapper written to $TMPDIR), a stand-in that breaks the reply stream
%% on request.
%%
%% Tests wait on monitors and messages; where only the pool's counters can
%% tell (wait_until/2), they poll them. Timeouts are generous: their only job
%% is to catch deadlocks.
-module(poolport_e2e_tests).

-include_lib("eunit/include/eunit.hrl").

%% Shared with poolport_chaos_tests.
-export([fixtures_dir/0, python_env/0, wait_until/2, os_alive/1]).
%% Shared with poolport_cluster_tests.
-export([opts/1, start_distribution/0, stop_distribution/1, in_fresh_process/1, pmap/3]).
%% The events handler of events/0: forwards to the process registered as
%% poolport_events_sink; raises on a call to `fail' after `crash_on_fail'.
-export([handle_event/3]).

-define(M, pp_handlers).
%% Upper bound for anything that should take well under a second.
-define(DEADLOCK, 30000).

%% Fixtures.

shared_pool_test_() ->
    {setup, fun start_shared/0, fun stop_pool/1,
     fun(Pool) ->
         [{Title, {timeout, 120, fun() -> Test(Pool) end}} || {Title, Test} <- [
             {"results of calls", fun results/1},
             {"terms round-trip", fun round_trip/1},
             {"300 concurrent callers get their own answers", fun concurrent/1},
             {"Python exception is a user error", fun user_error/1},
             {"unknown module and function are server errors", fun server_errors/1},
             {"cast returns ok, has run when a later call is answered", fun cast/1},
             {"timeout: {error, timeout}, late reply dropped, no stray message", fun timeout/1},
             {"caller-side timeout: alias drops the late reply", fun caller_timeout/1},
             {"dead caller's reply is discarded", fun dead_caller/1},
             {"infinity timeout", fun infinity/1},
             {"a storm of caller timeouts: no stray reply, nothing left behind", fun timeout_storm/1},
             {"timeout 1 bsl 59 / 1 bsl 64: clamped, call and bystander fine",
              fun huge_timeout/1},
             {"timeout -1 or an atom: badarg in the caller, pool stays up",
              fun bad_timeout/1},
             {"info/1 fields", fun info/1}
         ]]
     end}.

own_pool_test_() ->
    [{Title, {timeout, 120, Test}} || {Title, Test} <- [
        {"kill -9 of Python: pending get port_closed, pool recovers", fun kill_recover/0},
        {"kill -9 of Python leaves no orphan processes", fun kill_no_orphans/0},
        {"Python keeps dying: pool stops with restart_intensity", fun intensity/0},
        {"stop/1 leaves no OS process", fun stop_clean/0},
        {"atom_encoding utf8: the same terms and errors back", fun utf8_atoms/0},
        {"stop/1 with a pending call", fun stop_pending/0},
        {"start/1 under poolport_sup, name, packet 2", fun start_supervised/0},
        {"start errors", fun start_errors/0},
        {"pools from the application environment", fun app_env_pools/0},
        {"a demonitored alias drops late replies (OTP 24+)", fun alias_semantics/0},
        {"the YAML's timeout_ms beats the client's longer call timeout", fun yaml_timeout/0},
        {"config => {priv, App, Path}: a release's own YAML", fun priv_config/0},
        {"events => Module: call start/stop/exception, Python restart; a raising handler is detached",
         fun events/0},
        {"no pool: call/info return {error, noproc}, cast ok, caller survives", fun absent_pool/0},
        {"pool on another node: works, then {error, {nodedown, Node}}", fun remote_pool/0}
    ]].

%% Misaligned reply streams, provoked by test/fixtures/fake_tagged_serve.py
%% standing in for `poolport serve --reply-tags'.
misaligned_test_() ->
    [{Title, {timeout, 120, Test}} || {Title, Test} <- [
        {"fake server: tagged replies reach their callers", fun fake_aligned/0},
        {"lost reply: waiting callers get {error, misaligned}, pool reopens",
         fun lost_reply/0},
        {"duplicate reply never reaches the next caller", fun duplicate_reply/0},
        {"short reply frame is a misalignment", fun short_reply/0},
        {"misaligned first reply: start fails", fun misaligned_start/0},
        {"real server: frames Python refuses keep their numbers", fun refused_frames_aligned/0}
    ]].

start_shared() ->
    {ok, Pool} = poolport:start_link(opts(#{})),
    unlink(Pool),
    Pool.

stop_pool(Pool) ->
    ok = poolport:stop(Pool).

%% Shared-pool tests.

results(Pool) ->
    ?assertEqual({ok, 42}, poolport:call(Pool, ?M, twice, [21])),
    ?assertEqual({ok, 42}, poolport:call(Pool, ?M, twice, [21], 5000)),
    ?assertEqual({ok, 332833500}, poolport:call(Pool, ?M, burn, [1000])),
    ?assertMatch({ok, N} when is_integer(N), poolport:call(Pool, ?M, getpid, [])).

round_trip(Pool) ->
    Terms = [0, -1, 255, 256, 1 bsl 100, -(1 bsl 70), 1.5, -0.25, true, false, undefined,
             some_atom, 'Ünïcode', <<>>, <<"bytes">>, <<1, 2, 3>>, [], [1, 2, 3],
             "charlist", [a, [b, <<"c">>]], {}, {1, two, <<"3">>}, #{a => 1, <<"k">> => [x]},
             lists:duplicate(1000, {x, 1.0}), binary:copy(<<7>>, 1000000)],
    [?assertEqual({ok, T}, poolport:call(Pool, ?M, echo, [T])) || T <- Terms].

concurrent(Pool) ->
    N = 300,
    Self = self(),
    Pids = [spawn_monitor(fun() ->
                Payload = {I, integer_to_binary(I), [I, I + 1]},
                R1 = poolport:call(Pool, ?M, echo, [Payload], ?DEADLOCK),
                R2 = poolport:call(Pool, ?M, twice, [I], ?DEADLOCK),
                Self ! {answer, I, R1, R2}
            end) || I <- lists:seq(1, N)],
    Answers = [receive {answer, I, R1, R2} -> {I, R1, R2} after ?DEADLOCK -> error(deadlock) end
               || _ <- Pids],
    [receive {'DOWN', MRef, process, Pid, normal} -> ok after ?DEADLOCK -> error(deadlock) end
     || {Pid, MRef} <- Pids],
    ?assertEqual([{I, {ok, {I, integer_to_binary(I), [I, I + 1]}}, {ok, 2 * I}}
                  || I <- lists:seq(1, N)],
                 lists:sort(Answers)).

user_error(Pool) ->
    #{errors := E0} = poolport:info(Pool),
    ?assertMatch({error, {user, _, <<"ValueError">>, <<"no good">>, _}},
                 poolport:call(Pool, ?M, fail, [<<"no good">>])),
    {error, {user, _, _, _, Trace}} = poolport:call(Pool, ?M, fail, []),
    ?assert(is_list(Trace)),
    ?assert(lists:all(fun is_binary/1, Trace)),
    ?assertMatch(#{errors := E} when E =:= E0 + 2, poolport:info(Pool)),
    ?assertEqual({ok, 2}, poolport:call(Pool, ?M, twice, [1])).

server_errors(Pool) ->
    ?assertMatch({error, {server, 1, _, _, _}}, poolport:call(Pool, os, getcwd, [])),
    ?assertMatch({error, {server, 2, _, _, _}}, poolport:call(Pool, ?M, no_such_fun, [])).

cast(Pool) ->
    File = filename:join(tmp_dir(), "poolport_cast_" ++ os:getpid() ++ ".txt"),
    _ = file:delete(File),
    Path = list_to_binary(File),
    [?assertEqual(ok, poolport:cast(Pool, ?M, append, [Path, integer_to_binary(I)]))
     || I <- lists:seq(1, 5)],
    %% Replies come in request order: once this call is answered, the casts
    %% before it have run (in parallel on the workers, so in any order).
    ?assertEqual({ok, done}, poolport:call(Pool, ?M, echo, [done])),
    {ok, Content} = file:read_file(File),
    ?assertEqual([<<"1">>, <<"2">>, <<"3">>, <<"4">>, <<"5">>],
                 lists:sort(binary:split(Content, <<"\n">>, [global, trim_all]))),
    ok = file:delete(File).

timeout(Pool) ->
    #{dropped := D0, timeouts := T0} = poolport:info(Pool),
    Start = erlang:monotonic_time(millisecond),
    {Result, Mailbox} = in_fresh_process(fun() ->
        R = poolport:call(Pool, ?M, sleep_ms, [3000], 200),
        %% Python's own timeout answer arrives later and is dropped (unless
        %% it beat the caller's timer: then it was the caller's answer).
        wait_until(fun() -> maps:get(in_flight, poolport:info(Pool)) =:= 0 end, ?DEADLOCK),
        R
    end),
    Elapsed = erlang:monotonic_time(millisecond) - Start,
    ?assertEqual({error, timeout}, Result),
    ?assertEqual([], Mailbox),
    %% Python stopped the call at ~200 ms instead of sleeping 3 s.
    ?assert(Elapsed < 2500),
    ?assertMatch(#{dropped := D, timeouts := T, in_flight := 0, waiting := 0}
                   when (D =:= D0 + 1 orelse D =:= D0) andalso T =:= T0 + 1,
                 poolport:info(Pool)),
    ?assertEqual({ok, 3}, poolport:call(Pool, ?M, echo, [3])).

caller_timeout(Pool) ->
    %% With the pool suspended the server cannot answer: the caller gives
    %% up on its own. When the pool resumes, it sends the request, learns
    %% that the caller gave up, and drops the reply.
    #{calls := C0} = poolport:info(Pool),
    {Result, Mailbox} = in_fresh_process(fun() ->
        ok = sys:suspend(Pool),
        R = poolport:call(Pool, ?M, echo, [late], 10),
        ok = sys:resume(Pool),
        wait_until(fun() ->
            #{calls := C, in_flight := F} = poolport:info(Pool),
            C > C0 andalso F =:= 0
        end, ?DEADLOCK),
        R
    end),
    ?assertEqual({error, timeout}, Result),
    ?assertEqual([], Mailbox),
    ?assertMatch(#{waiting := 0}, poolport:info(Pool)).

dead_caller(Pool) ->
    #{dropped := D0} = poolport:info(Pool),
    {Pid, MRef} = spawn_monitor(fun() -> poolport:call(Pool, ?M, sleep_ms, [300], ?DEADLOCK) end),
    wait_until(fun() -> maps:get(waiting, poolport:info(Pool)) =:= 1 end, ?DEADLOCK),
    exit(Pid, kill),
    receive {'DOWN', MRef, process, Pid, killed} -> ok end,
    wait_until(fun() -> maps:get(in_flight, poolport:info(Pool)) =:= 0 end, ?DEADLOCK),
    ?assertMatch(#{dropped := D, waiting := 0} when D =:= D0 + 1, poolport:info(Pool)).

%% 200 callers, 20 echo calls each with timeouts of 0..2 ms: many time out,
%% many right as Python answers (the race between a reply and the caller
%% giving up); Python itself rarely does (an echo takes far less than 1 ms,
%% and a call it stops costs a worker restart). Every caller gets its own
%% answer or {error, timeout}, its mailbox stays empty, and once Python has
%% answered everything the pool holds nothing for anyone.
timeout_storm(Pool) ->
    #{timeouts := T0, dropped := D0} = poolport:info(Pool),
    Self = self(),
    Callers = [spawn_link(fun() ->
                   rand:seed(exsss, {I, I, I}),
                   Rs = [case poolport:call(Pool, ?M, echo, [{I, J}], rand:uniform(3) - 1) of
                             {ok, {I, J}} -> ok;
                             {error, timeout} -> timeout;
                             Other -> {unexpected, Other}
                         end || J <- lists:seq(1, 20)],
                   receive after 200 -> ok end,  % late replies would have arrived by now
                   {messages, Mailbox} = process_info(self(), messages),
                   Self ! {storm, self(), Rs, Mailbox}
               end) || I <- lists:seq(1, 200)],
    Results = [receive {storm, C, Rs, Mailbox} -> {Rs, Mailbox} after ?DEADLOCK -> error(deadlock) end
               || C <- Callers],
    All = lists:append([Rs || {Rs, _} <- Results]),
    ?assertEqual([], [R || R <- All, R =/= ok, R =/= timeout]),
    ?assertEqual([], lists:append([M || {_, M} <- Results])),
    TimedOut = length([R || R <- All, R =:= timeout]),
    ?assert(TimedOut > 0),
    wait_until(fun() -> maps:get(in_flight, poolport:info(Pool)) =:= 0 end, ?DEADLOCK),
    #{timeouts := T, dropped := D, waiting := 0} = poolport:info(Pool),
    %% A reply that reached a caller just as it gave up counts as an answer.
    ?assert(T - T0 =< TimedOut),
    ?assert(D - D0 =< T - T0),
    ?assertEqual(0, poolport_server:gave_up_count(Pool)),
    ?assertEqual({ok, 1}, poolport:call(Pool, ?M, echo, [1])).

infinity(Pool) ->
    ?assertEqual({ok, 10}, poolport:call(Pool, ?M, sleep_ms, [10], infinity)).

huge_timeout(Pool) ->
    %% Issue 13: erlang:send_after/3 refused such a timeout inside the pool,
    %% which crashed and took every call in flight with it. Now the timeout
    %% is clamped to 4294967295 ms, also in the packet Python gets.
    Max = 4294967295,
    Self = self(),
    Bystander = spawn_link(fun() ->
        Self ! {bystander, self(), poolport:call(Pool, ?M, sleep_ms, [300], ?DEADLOCK)}
    end),
    wait_until(fun() -> maps:get(waiting, poolport:info(Pool)) >= 1 end, ?DEADLOCK),
    %% Record the {info, timeout, ...} packets the pool encodes meanwhile
    %% (a run of equal timeouts is encoded once).
    erlang:trace_pattern({poolport_wire, encode_timeout, 1},
                         [{'_', [], [{return_trace}]}], [local]),
    1 = erlang:trace(Pool, true, [call, {tracer, self()}]),
    try
        ?assertEqual({ok, 50}, poolport:call(Pool, ?M, sleep_ms, [50], 1 bsl 59)),
        ?assertEqual({ok, 7}, poolport:call(Pool, ?M, echo, [7], 1 bsl 64)),
        ?assertEqual({ok, 8}, poolport:call(Pool, ?M, echo, [8], Max + 1)),
        ?assertEqual({ok, 9}, poolport:call(Pool, ?M, echo, [9], Max))
    after
        erlang:trace(Pool, false, [call]),
        erlang:trace_pattern({poolport_wire, encode_timeout, 1}, false, [local])
    end,
    receive {bystander, Bystander, R} -> ?assertEqual({ok, 300}, R)
    after ?DEADLOCK -> error(deadlock)
    end,
    Sent = trace_returns(Pool),
    ?assertEqual([{info, timeout, [{ms, Max}]}], lists:usort([binary_to_term(B) || B <- Sent])),
    ?assertEqual(Max, poolport_server:clamp_timeout(1 bsl 64)),
    ?assertEqual(0, poolport_server:clamp_timeout(0)),
    ?assertEqual(infinity, poolport_server:clamp_timeout(infinity)),
    ?assertMatch(#{status := running, waiting := 0, in_flight := 0}, poolport:info(Pool)),
    ?assertEqual({ok, 1}, poolport:call(Pool, ?M, echo, [1])).

trace_returns(Pid) ->
    receive
        {trace, Pid, return_from, {poolport_wire, encode_timeout, 1}, Bin} ->
            [Bin | trace_returns(Pid)];
        {trace, Pid, call, {poolport_wire, encode_timeout, _}} ->
            trace_returns(Pid)
    after 1000 ->
        []
    end.

bad_timeout(Pool) ->
    #{calls := C0} = poolport:info(Pool),
    [?assertError(badarg, poolport:call(Pool, ?M, echo, [1], T))
     || T <- [-1, -(1 bsl 64), forever, undefined, 1.5, "5000"]],
    ?assert(is_process_alive(Pool)),
    %% Refused in the caller: the pool never saw these calls.
    ?assertMatch(#{calls := C0, status := running}, poolport:info(Pool)),
    ?assertEqual({ok, 2}, poolport:call(Pool, ?M, twice, [1])).

info(Pool) ->
    Info = poolport:info(Pool),
    [?assert(maps:is_key(K, Info))
     || K <- [workers, in_flight, calls, errors, restarts, os_pid, casts, timeouts,
              dropped, waiting, status, misaligned]],
    #{workers := 2, in_flight := 0, restarts := 0, os_pid := OsPid, status := running,
      calls := Calls, packet := 4, misaligned := 0} = Info,
    ?assert(is_integer(OsPid) andalso os_alive(OsPid)),
    ?assertEqual({ok, 1}, poolport:call(Pool, ?M, echo, [1])),
    ?assertMatch(#{calls := C} when C =:= Calls + 1, poolport:info(Pool)),
    ?assertError(badarg, poolport:call(Pool, "m", f, [])),
    ?assertError(badarg, poolport:call(Pool, m, f, not_a_list)).

%% Tests with their own pool.

kill_recover() ->
    {ok, Pool} = poolport:start_link(opts(#{name => pp_kill})),
    #{os_pid := OsPid, restarts := 0} = poolport:info(Pool),
    Children = children(OsPid),
    Self = self(),
    Callers = [spawn_link(fun() ->
                   Self ! {pending, self(), poolport:call(pp_kill, ?M, sleep_ms, [20000], 60000)}
               end) || _ <- lists:seq(1, 4)],
    wait_until(fun() -> maps:get(waiting, poolport:info(Pool)) =:= 4 end, ?DEADLOCK),
    Killed = erlang:monotonic_time(millisecond),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    [receive {pending, C, R} -> ?assertEqual({error, port_closed}, R) after ?DEADLOCK -> error(deadlock) end
     || C <- Callers],
    ?assert(erlang:monotonic_time(millisecond) - Killed < 5000),
    %% Recovery: same process, same name, a new Python.
    wait_until(fun() -> maps:get(status, poolport:info(Pool)) =:= running end, ?DEADLOCK),
    ?assertEqual(Pool, whereis(pp_kill)),
    ?assertEqual({ok, 42}, poolport:call(pp_kill, ?M, twice, [21])),
    #{os_pid := OsPid2, restarts := 1, workers := 2, errors := Errors} = poolport:info(Pool),
    ?assertNotEqual(OsPid, OsPid2),
    ?assert(Errors >= 4),
    ?assertNot(os_alive(OsPid)),
    unlink(Pool),
    ok = poolport:stop(Pool),
    kill_orphans(Children).

kill_no_orphans() ->
    %% Python's side of "no OS process left behind": once the dispatcher is
    %% gone, its workers (busy or idle) must exit on their own.
    {ok, Pool} = poolport:start_link(opts(#{})),
    unlink(Pool),
    #{os_pid := OsPid} = poolport:info(Pool),
    Children = children(OsPid),
    ?assertNotEqual([], Children),
    Self = self(),
    _ = spawn_link(fun() -> Self ! {pending, poolport:call(Pool, ?M, sleep_ms, [1000], 60000)} end),
    wait_until(fun() -> maps:get(waiting, poolport:info(Pool)) =:= 1 end, ?DEADLOCK),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    receive {pending, R} -> ?assertEqual({error, port_closed}, R) after ?DEADLOCK -> error(deadlock) end,
    ok = poolport:stop(Pool),
    Left = try
               wait_until(fun() -> not lists:any(fun os_alive/1, Children) end, 15000),
               []
           catch
               error:wait_until_timeout -> [{C, ps_cmd(C)} || C <- Children, os_alive(C)]
           end,
    %% Do not leave them running (they hold the test run's stdout open).
    kill_orphans([C || {C, _} <- Left]),
    ?assertEqual({orphans_after_15s, []}, {orphans_after_15s, Left}).

intensity() ->
    {ok, Pool} = poolport:start_link(opts(#{max_restarts => 1, restart_period => 60})),
    unlink(Pool),
    MRef = monitor(process, Pool),
    #{os_pid := OsPid1} = poolport:info(Pool),
    Children1 = children(OsPid1),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid1)),
    %% Reopened: a new os pid (the status alone could still show the old port).
    wait_until(fun() ->
        #{os_pid := P} = poolport:info(Pool),
        is_integer(P) andalso P =/= OsPid1
    end, ?DEADLOCK),
    ?assertEqual({ok, 1}, poolport:call(Pool, ?M, echo, [1])),
    #{os_pid := OsPid2, restarts := 1} = poolport:info(Pool),
    Children2 = children(OsPid2),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid2)),
    receive
        {'DOWN', MRef, process, Pool, Reason} ->
            ?assertMatch({restart_intensity, #{last_exit := {exit_status, _},
                                               max_restarts := 1, restart_period := 60}},
                         Reason)
    after ?DEADLOCK -> error(deadlock)
    end,
    kill_orphans(Children1 ++ Children2).

stop_clean() ->
    {ok, Pool} = poolport:start_link(opts(#{})),
    unlink(Pool),
    #{os_pid := OsPid} = poolport:info(Pool),
    %% Worker pids: enough concurrent calls to reach both workers.
    Workers = lists:usort(
        [Pid || {ok, Pid} <- pmap(fun(_) -> poolport:call(Pool, ?M, getpid, []) end,
                                   lists:seq(1, 20))]),
    ?assertNotEqual([], Workers),
    MRef = monitor(process, Pool),
    ?assertEqual(ok, poolport:stop(Pool)),
    receive {'DOWN', MRef, process, Pool, _} -> ok after ?DEADLOCK -> error(deadlock) end,
    %% stop/1 returns after the Python process exited.
    ?assertNot(os_alive(OsPid)),
    %% Its workers follow on their own.
    [wait_until(fun() -> not os_alive(W) end, 10000) || W <- Workers, W =/= OsPid].

stop_pending() ->
    {ok, Pool} = poolport:start_link(opts(#{stop_timeout => 1000})),
    unlink(Pool),
    #{os_pid := OsPid} = poolport:info(Pool),
    Children = children(OsPid),
    Self = self(),
    Caller = spawn_link(fun() ->
        Self ! {pending, self(), poolport:call(Pool, ?M, sleep_ms, [20000], 60000)}
    end),
    wait_until(fun() -> maps:get(waiting, poolport:info(Pool)) =:= 1 end, ?DEADLOCK),
    ?assertEqual(ok, poolport:stop(Pool)),
    receive {pending, Caller, R} -> ?assertEqual({error, port_closed}, R)
    after ?DEADLOCK -> error(deadlock)
    end,
    %% stop/1 ended it with SIGKILL; on a loaded machine the kernel may take a moment to reap it
    wait_until(fun() -> not os_alive(OsPid) end, 5000),
    wait_until(fun() -> not lists:any(fun os_alive/1, Children) end, 10000).

%% Issue 19: replies write atoms as ATOM_EXT by default (what OTP 25 writes);
%% with `atom_encoding: utf8' as SMALL_ATOM_UTF8_EXT. binary_to_term reads both.
utf8_atoms() ->
    Cfg = filename:join(tmp_dir(), "poolport_utf8_" ++ os:getpid() ++ ".yaml"),
    ok = file:write_file(Cfg, ["workers: 1\nmodules: [pp_handlers]\nlog_level: WARNING\n",
                               "atom_encoding: utf8\npython_path: ['", fixtures_dir(), "']\n"]),
    {ok, Pool} = poolport:start_link(opts(#{config => Cfg})),
    unlink(Pool),
    try
        Terms = [true, false, undefined, some_atom, 'Ünïcode', '日本', {ok, [a, #{b => c}]}],
        [?assertEqual({ok, T}, poolport:call(Pool, ?M, echo, [T])) || T <- Terms],
        ?assertMatch({error, {user, 0, <<"ValueError">>, <<"no good">>, _}},
                     poolport:call(Pool, ?M, fail, [<<"no good">>])),
        ?assertMatch({error, {server, 2, <<"NoSuchFunction">>, _, _}},
                     poolport:call(Pool, ?M, no_such_function, []))
    after
        ok = poolport:stop(Pool),
        ok = file:delete(Cfg)
    end.

start_supervised() ->
    {ok, Pool} = poolport:start(opts(#{name => pp_sup, packet => 2, stop_timeout => 120000})),
    ?assertEqual(Pool, whereis(pp_sup)),
    ?assert(lists:keymember(Pool, 2, supervisor:which_children(poolport_sup))),
    %% Its shutdown follows its own stop_timeout, as in poolport:child_spec/1.
    {Id, Pool, worker, _} = lists:keyfind(Pool, 2, supervisor:which_children(poolport_sup)),
    {ok, #{shutdown := Shutdown}} = supervisor:get_childspec(poolport_sup, Id),
    ?assertEqual(maps:get(shutdown, poolport:child_spec(opts(#{stop_timeout => 120000}))),
                 Shutdown),
    ?assert(Shutdown > 120000),
    ?assertEqual({ok, <<"hi">>}, poolport:call(pp_sup, ?M, echo, [<<"hi">>])),
    ?assertMatch(#{packet := 2}, poolport:info(pp_sup)),
    %% A request that does not fit {packet, 2} is refused, the pool carries on.
    ?assertMatch({error, {protocol, 1, <<"FrameTooLarge">>, _, _}},
                 poolport:call(pp_sup, ?M, echo, [binary:copy(<<0>>, 70000)])),
    ?assertEqual({ok, 2}, poolport:call(pp_sup, ?M, twice, [1])),
    %% A crash of the pool process is repaired by the supervisor.
    MRef = monitor(process, Pool),
    exit(Pool, kill),
    receive {'DOWN', MRef, process, Pool, killed} -> ok end,
    wait_until(fun() -> is_pid(whereis(pp_sup)) end, ?DEADLOCK),
    ?assertEqual({ok, 4}, poolport:call(pp_sup, ?M, twice, [2])),
    #{os_pid := OsPid} = poolport:info(pp_sup),
    ok = poolport:stop(pp_sup),
    ?assertEqual(undefined, whereis(pp_sup)),
    ?assertNot(os_alive(OsPid)),
    ?assertNot(lists:any(fun({_, P, _, _}) -> P =:= Pool end,
                         supervisor:which_children(poolport_sup))),
    %% Removed, not left behind as a terminated child.
    ?assertEqual({error, not_found}, supervisor:get_childspec(poolport_sup, Id)).

%% Issue 13: poolport_sup used a fixed 60000 ms shutdown, so a pool with a
%% longer stop_timeout was killed in the middle of its shutdown.
sup_shutdown_test() ->
    Opts = #{stop_timeout => 120000},
    {ok, Cfg} = poolport_opts:check_opts(Opts),
    #{shutdown := SupShutdown, restart := transient} = poolport_sup:child_spec(Cfg),
    #{shutdown := OwnShutdown} = poolport:child_spec(Opts),
    ?assertEqual(OwnShutdown, SupShutdown),
    ?assertEqual(poolport_os:shutdown_timeout(Cfg), SupShutdown),
    ?assert(SupShutdown > 120000),
    %% Every pool gets its own id.
    #{id := Id1} = poolport_sup:child_spec(Cfg),
    #{id := Id2} = poolport_sup:child_spec(Cfg),
    ?assertNotEqual(Id1, Id2).

start_errors() ->
    ?assertEqual({error, {unknown_option, bogus}}, poolport:start_link(#{bogus => 1})),
    ?assertEqual({error, {python_not_found, "no-such-python-poolport"}},
                 poolport:start_link(opts(#{python => "no-such-python-poolport"}))),
    ?assertMatch({error, {config_not_found, _}},
                 poolport:start_link(opts(#{config => "no/such/config.yaml"}))),
    Bad = filename:join(tmp_dir(), "poolport_bad_" ++ os:getpid() ++ ".yaml"),
    ok = file:write_file(Bad, <<"workers: many\n">>),
    %% Python refuses the config and exits: start/1 (under the supervisor)
    %% reports it, with what Python said (issue 18: the key, in words).
    {error, {python_exited, N, Tail}} = poolport:start(opts(#{config => Bad})),
    ?assert(N =/= 0),
    ?assertMatch({_, _}, binary:match(Tail, <<"workers: expected an integer >= 1 or 'auto', got 'many'">>)),
    ok = file:delete(Bad),
    %% A worker_init that fails: its traceback.
    Init = filename:join(tmp_dir(), "poolport_init_" ++ os:getpid() ++ ".yaml"),
    ok = file:write_file(Init, ["modules: [pp_handlers]\nworker_init: 'pp_handlers:no_such_init'\n",
                                "python_path: [\"", fixtures_dir(), "\"]\n"]),
    {error, {python_exited, _, InitTail}} = poolport:start(opts(#{config => Init})),
    ?assertMatch({_, _}, binary:match(InitTail, <<"has no function 'no_such_init'">>)),
    ok = file:delete(Init),
    %% An interpreter without poolport.
    {error, {python_exited, 1, NoModule}} =
        poolport:start(opts(#{python => "/usr/bin/python3", env => [{"PYTHONPATH", "/nonexistent"}]})),
    ?assertMatch({_, _}, binary:match(NoModule, <<"No module named poolport">>)),
    ?assertError({badarg, {bad_option, packet, 3}}, poolport:child_spec(#{packet => 3})),
    ?assertMatch(#{id := my_pool, start := {poolport, start_link, [_]}},
                 poolport:child_spec(#{name => my_pool})).

app_env_pools() ->
    _ = application:stop(poolport),
    _ = application:load(poolport),
    ok = application:set_env(poolport, pools, [{pp_env, maps:to_list(opts(#{}))}]),
    try
        {ok, _} = application:ensure_all_started(poolport),
        Pool = whereis(pp_env),
        ?assert(is_pid(Pool)),
        ?assertEqual({ok, 10}, poolport:call(pp_env, ?M, twice, [5])),
        #{os_pid := OsPid} = poolport:info(pp_env),
        ok = application:stop(poolport),
        ?assertEqual(undefined, whereis(pp_env)),
        ?assertNot(os_alive(OsPid))
    after
        ok = application:set_env(poolport, pools, [])
    end.

alias_semantics() ->
    %% What poolport's caller-side timeout relies on: once the caller has
    %% demonitored a monitor made with {alias, demonitor}, a reply sent to
    %% that alias later never reaches its mailbox.
    {Result, Mailbox} = in_fresh_process(fun() ->
        Self = self(),
        Server = spawn(fun() ->
            receive {ping, Alias} ->
                receive go -> ok end,
                Alias ! {Alias, pong},
                Self ! replied
            end
        end),
        Alias = erlang:monitor(process, Server, [{alias, demonitor}]),
        Server ! {ping, Alias},
        R = receive {Alias, pong} -> pong after 10 -> erlang:demonitor(Alias, [flush]), timeout end,
        Server ! go,
        %% Had the reply been delivered, it would be in the mailbox before
        %% 'replied' (same sender, messages stay in order).
        receive replied -> ok end,
        R
    end),
    ?assertEqual(timeout, Result),
    ?assertEqual([], Mailbox).

%% call/4, call/5, cast/4 and info/1 for every kind of pool reference that
%% names no process: no exit, no stray message.
absent_pool() ->
    {DeadPid, MRef} = spawn_monitor(fun() -> ok end),
    receive {'DOWN', MRef, process, DeadPid, _} -> ok end,
    Down = 'poolport_nowhere@localhost',
    Absent = [{DeadPid, noproc},
              {poolport_no_such_pool, noproc},
              {{poolport_no_such_pool, node()}, noproc},
              {{global, poolport_no_such_pool}, noproc},
              {{via, global, poolport_no_such_pool}, noproc},
              {{poolport_no_such_pool, Down}, {nodedown, Down}}],
    [begin
         {Results, Messages} = in_fresh_process(fun() ->
             [poolport:call(Pool, ?M, echo, [1]),
              poolport:call(Pool, ?M, echo, [1], 1000),
              poolport:call(Pool, ?M, echo, [1], infinity),
              poolport:cast(Pool, ?M, echo, [1]),
              poolport:info(Pool)]
         end),
         E = {error, Reason},
         ?assertEqual({Pool, [E, E, E, ok, E]}, {Pool, Results}),
         ?assertEqual({Pool, []}, {Pool, Messages})
     end || {Pool, Reason} <- Absent],
    %% A pool that was stopped.
    {ok, Pool} = poolport:start_link(opts(#{name => poolport_stopped_pool})),
    ok = poolport:stop(Pool),
    ?assertEqual({error, noproc}, poolport:call(Pool, ?M, echo, [1])),
    ?assertEqual({error, noproc}, poolport:call(poolport_stopped_pool, ?M, echo, [1], 1000)),
    ?assertEqual({error, noproc}, poolport:info(poolport_stopped_pool)),
    ?assertEqual(ok, poolport:cast(poolport_stopped_pool, ?M, echo, [1])),
    %% Bad arguments are still refused, pool or not.
    ?assertError(badarg, poolport:call(poolport_no_such_pool, ?M, echo, [1], -1)).

handle_event(Event, Measurements, Meta) ->
    case {Event, Meta} of
        {[poolport, call, start], #{function := crash}} -> error(handler_bug);
        _ -> poolport_events_sink ! {event, Event, Measurements, Meta}
    end.

%% Issue 18: telemetry-shaped events.
events() ->
    register(poolport_events_sink, self()),
    {ok, Pool} = poolport:start(opts(#{name => pp_events, events => ?MODULE})),
    try
        ?assertEqual({ok, 42}, poolport:call(pp_events, ?M, twice, [21])),
        Meta = #{pool => pp_events, module => ?M, function => twice},
        receive {event, [poolport, call, start], #{system_time := _}, M1} -> ?assertEqual(Meta, M1)
        after ?DEADLOCK -> error(no_start) end,
        receive {event, [poolport, call, stop], #{duration := D}, M2} ->
                ?assertEqual(Meta, M2), ?assert(is_integer(D) andalso D > 0)
        after ?DEADLOCK -> error(no_stop) end,
        {error, {user, 0, <<"ValueError">>, _, _}} = poolport:call(Pool, ?M, fail, []),
        receive {event, [poolport, call, start], _, #{pool := Pool, function := fail}} -> ok
        after ?DEADLOCK -> error(no_start) end,
        receive {event, [poolport, call, exception], #{duration := _},
                 #{kind := error, reason := {user, 0, <<"ValueError">>, _, _}}} -> ok
        after ?DEADLOCK -> error(no_exception) end,
        #{os_pid := OsPid} = poolport:info(Pool),
        _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
        receive {event, [poolport, python, restart], #{restarts := 1}, #{pool := pp_events}} -> ok
        after ?DEADLOCK -> error(no_restart) end,
        %% A handler that raises: the call is unaffected, the handler detached.
        wait_until(fun() -> maps:get(status, poolport:info(Pool)) =:= running end, ?DEADLOCK),
        ?assertMatch({error, {server, 2, <<"NoSuchFunction">>, _, _}}, poolport:call(pp_events, ?M, crash, [])),
        ?assertEqual({ok, 4}, poolport:call(pp_events, ?M, twice, [2])),
        receive {event, _, _, _} = Late -> error({still_attached, Late}) after 200 -> ok end
    after
        unregister(poolport_events_sink),
        ok = poolport:stop(Pool)
    end.

%% Issue 18: a config shipped in an application's priv directory.
priv_config() ->
    {ok, Pool} = poolport:start(opts(#{config => {priv, poolport, "demo.yaml"}})),
    try
        ?assertEqual({ok, [1, <<"two">>]}, poolport:call(Pool, 'poolport.demo_handlers', echo, [[1, <<"two">>]])),
        ?assertMatch(#{workers := 2}, poolport:info(Pool))
    after
        ok = poolport:stop(Pool)
    end.

%% Issue 13: the client sends {info, timeout, ...} with the caller's timeout
%% before every call; a shorter `timeout_ms' in the YAML must still stop it.
yaml_timeout() ->
    Yaml = filename:join(tmp_dir(), "poolport_timeout_" ++ os:getpid() ++ ".yaml"),
    ok = file:write_file(Yaml, ["workers: 1\nmodules: [pp_handlers]\ntimeout_ms: 300\n",
                                "python_path: [\"", fixtures_dir(), "\"]\n"]),
    {ok, Pool} = poolport:start_link(opts(#{config => Yaml})),
    try
        T0 = erlang:monotonic_time(millisecond),
        ?assertEqual({error, timeout}, poolport:call(Pool, ?M, sleep_ms, [5000], 20000)),
        ?assert(erlang:monotonic_time(millisecond) - T0 < 4000),
        ?assertEqual({ok, 42}, poolport:call(Pool, ?M, twice, [21]))
    after
        unlink(Pool),
        ok = poolport:stop(Pool),
        file:delete(Yaml)
    end.

%% A pool on a peer node, addressed as {Name, Node}: the test starts epmd and
%% distribution itself, and fails (never skips) if it cannot.
remote_pool() ->
    {ok, WasAlive} = start_distribution(),
    try remote_pool_() after stop_distribution(WasAlive) end.

remote_pool_() ->
    {ok, Peer, Node} = peer:start_link(#{name => peer:random_name(poolport_peer),
                                         args => ["-pa" | code:get_path()]}),
    Name = poolport_remote_pool,
    Pool = {Name, Node},
    try
        {ok, _} = erpc:call(Node, poolport, start, [opts(#{name => Name})]),
        ?assertEqual({ok, 42}, poolport:call(Pool, ?M, twice, [21])),
        ?assertEqual({ok, 42}, poolport:call(Pool, ?M, twice, [21], 5000)),
        ?assertEqual(ok, poolport:cast(Pool, ?M, echo, [1])),
        ?assertMatch(#{status := running}, poolport:info(Pool)),
        ?assertEqual({error, noproc}, poolport:call({poolport_no_such_pool, Node}, ?M, echo, [1])),
        %% The node goes down while a call is pending.
        Self = self(),
        Caller = spawn_link(fun() ->
            Self ! {self(), in_fresh_process(fun() ->
                poolport:call(Pool, ?M, sleep_ms, [20000], ?DEADLOCK)
            end)}
        end),
        ok = wait_until(fun() -> maps:get(waiting, poolport:info(Pool)) =:= 1 end, ?DEADLOCK),
        ok = peer:stop(Peer),
        receive
            {Caller, {Result, Messages}} ->
                ?assertEqual({error, {nodedown, Node}}, Result),
                ?assertEqual([], Messages)
        after ?DEADLOCK -> error(deadlock)
        end,
        %% And stays down.
        ?assertEqual({error, {nodedown, Node}}, poolport:call(Pool, ?M, echo, [1])),
        ?assertEqual({error, {nodedown, Node}}, poolport:info(Pool)),
        ?assertEqual(ok, poolport:cast(Pool, ?M, echo, [1]))
    after
        catch peer:stop(Peer)
    end.

%% Misalignment tests.

fake_aligned() ->
    with_fake_pool(#{}, fun(Pool) ->
        ?assertMatch(#{workers := 1, misaligned := 0, status := running}, poolport:info(Pool)),
        ?assertEqual({ok, [21]}, poolport:call(Pool, fake, echo, [21])),
        ?assertEqual(ok, poolport:cast(Pool, fake, echo, [x])),
        ?assertEqual({ok, [a, <<"b">>]}, poolport:call(Pool, fake, echo, [a, <<"b">>], 5000)),
        ?assertMatch({error, {server, 2, _, _, _}}, poolport:call(Pool, fake, nope, [])),
        %% Pipelined callers, each with its own answer.
        Answers = pmap(fun(I) -> poolport:call(Pool, fake, echo, [I], ?DEADLOCK) end,
                       lists:seq(1, 200)),
        ?assertEqual([{ok, [I]} || I <- lists:seq(1, 200)], Answers),
        ?assertMatch(#{misaligned := 0, restarts := 0, in_flight := 0}, poolport:info(Pool))
    end).

%% The fake swallows the reply to `b': without the tags, `b''s caller would
%% get `c''s answer and `c''s caller the next one's.
lost_reply() ->
    with_fake_pool(#{name => pp_misaligned}, fun(Pool) ->
        #{os_pid := OsPid1} = poolport:info(Pool),
        ?assertEqual({ok, ok}, poolport:call(Pool, fake, lose_next, [])),
        Self = self(),
        B = spawn_link(fun() ->
                Self ! {b, self(), poolport:call(Pool, fake, echo, [b], ?DEADLOCK)}
            end),
        %% The pool's own counters only: poolport:info/1 would also send
        %% '$poolport':stats(), and the fake would lose that reply instead of b's.
        wait_until(fun() -> maps:get(waiting, gen_server:call(Pool, info)) =:= 1 end, ?DEADLOCK),
        {C, Mailbox} = in_fresh_process(fun() ->
            poolport:call(Pool, fake, echo, [c], ?DEADLOCK)
        end),
        ?assertEqual({error, misaligned}, C),
        ?assertEqual([], Mailbox),
        receive {b, B, RB} -> ?assertEqual({error, misaligned}, RB)
        after ?DEADLOCK -> error(deadlock)
        end,
        ?assertMatch(#{misaligned := 1, waiting := 0, in_flight := 0}, poolport:info(Pool)),
        assert_recovered(Pool, pp_misaligned, OsPid1)
    end).

%% The fake sends the reply to `a' twice; the copy arrives while `b' waits.
duplicate_reply() ->
    with_fake_pool(#{}, fun(Pool) ->
        #{os_pid := OsPid1, errors := E0} = poolport:info(Pool),
        ?assertEqual({ok, [a]}, poolport:call(Pool, fake, dup, [a])),
        {B, Mailbox} = in_fresh_process(fun() ->
            poolport:call(Pool, fake, echo, [b], ?DEADLOCK)
        end),
        ?assertEqual({error, misaligned}, B),
        ?assertEqual([], Mailbox),
        ?assertMatch(#{misaligned := 1, errors := E} when E =:= E0 + 1, poolport:info(Pool)),
        assert_recovered(Pool, undefined, OsPid1),
        %% Again on the new port: counted again, recovered again.
        ?assertEqual({ok, [a2]}, poolport:call(Pool, fake, dup, [a2])),
        ?assertEqual({error, misaligned}, poolport:call(Pool, fake, echo, [b2], ?DEADLOCK)),
        wait_until(fun() ->
            #{restarts := R, status := S} = poolport:info(Pool),
            R =:= 2 andalso S =:= running
        end, ?DEADLOCK),
        ?assertMatch(#{misaligned := 2}, poolport:info(Pool)),
        ?assertEqual({ok, [c]}, poolport:call(Pool, fake, echo, [c]))
    end).

short_reply() ->
    with_fake_pool(#{}, fun(Pool) ->
        #{os_pid := OsPid1} = poolport:info(Pool),
        ?assertEqual({error, misaligned}, poolport:call(Pool, fake, short, [], ?DEADLOCK)),
        ?assertMatch(#{misaligned := 1}, poolport:info(Pool)),
        assert_recovered(Pool, undefined, OsPid1)
    end).

misaligned_start() ->
    Wrapper = fake_python(),
    try
        Opts = (fake_opts(Wrapper))#{env => [{"POOLPORT_FAKE_SEQ_OFFSET", "1"}]},
        ?assertMatch({error, {misaligned, #{why := seq_mismatch, expected := 0, got := 1}}},
                     poolport:start(Opts))
    after
        ok = file:delete(Wrapper)
    end.

%% The real `poolport serve --reply-tags': a frame over its max_frame_bytes
%% gets an error reply that counts as a request (with and without the
%% timeout info packet before it), so the following replies stay aligned.
refused_frames_aligned() ->
    {ok, Pool} = poolport:start_link(opts(#{args => ["--max-frame-bytes", "1000"]})),
    unlink(Pool),
    try
        Big = binary:copy(<<1>>, 2000),
        Results = pmap(fun({I, T}) ->
                           case I rem 3 of
                               0 -> {I, poolport:call(Pool, ?M, echo, [Big], T)};
                               _ -> {I, poolport:call(Pool, ?M, echo, [I], T)}
                           end
                       end, [{I, T} || I <- lists:seq(1, 60), T <- [infinity, ?DEADLOCK]]),
        [case I rem 3 of
             0 -> ?assertMatch({I, {error, {protocol, 1, <<"FrameTooLarge">>, _, _}}}, R);
             _ -> ?assertEqual({I, {ok, I}}, R)
         end || {I, _} = R <- Results],
        ?assertEqual(ok, poolport:cast(Pool, ?M, echo, [Big])),
        ?assertEqual({ok, 1}, poolport:call(Pool, ?M, echo, [1])),
        ?assertMatch(#{misaligned := 0, restarts := 0, in_flight := 0}, poolport:info(Pool))
    after
        ok = poolport:stop(Pool)
    end.

%% After a misalignment: the same pool process (and name) reopened the port
%% to a new OS process, the old one is gone, calls are answered again.
assert_recovered(Pool, Name, OldOsPid) ->
    wait_until(fun() ->
        #{os_pid := P, status := S} = poolport:info(Pool),
        is_integer(P) andalso P =/= OldOsPid andalso S =:= running
    end, ?DEADLOCK),
    ?assert(is_process_alive(Pool)),
    [?assertEqual(Pool, whereis(Name)) || Name =/= undefined],
    ?assertMatch(#{restarts := 1, workers := 1}, poolport:info(Pool)),
    ?assertEqual({ok, [after_restart]}, poolport:call(Pool, fake, echo, [after_restart])),
    Answers = pmap(fun(I) -> poolport:call(Pool, fake, echo, [I], ?DEADLOCK) end,
                   lists:seq(1, 50)),
    ?assertEqual([{ok, [I]} || I <- lists:seq(1, 50)], Answers),
    wait_until(fun() -> not os_alive(OldOsPid) end, ?DEADLOCK).

%% Run Test with a pool whose "python" is the fake server; stop it after.
with_fake_pool(Extra, Test) ->
    Wrapper = fake_python(),
    try
        {ok, Pool} = poolport:start_link(maps:merge(fake_opts(Wrapper), Extra)),
        unlink(Pool),
        try Test(Pool) after ok = poolport:stop(Pool) end
    after
        ok = file:delete(Wrapper)
    end.

fake_opts(Wrapper) ->
    #{python => Wrapper, config => undefined, max_restarts => 10}.

%% An executable that the pool runs as its "python": it runs
%% test/fixtures/fake_tagged_serve.py with the real interpreter, passing on
%% the command line (`-m poolport serve ... --reply-tags').
fake_python() ->
    Python = os:getenv("POOLPORT_PYTHON", "python3"),
    Exe = case lists:member($/, Python) of
              true -> filename:absname(Python);
              false -> os:find_executable(Python)
          end,
    ?assert(is_list(Exe)),
    Script = filename:absname(filename:join(fixtures_dir(), "fake_tagged_serve.py")),
    Wrapper = filename:join(tmp_dir(), "poolport_fake_python_" ++ os:getpid() ++ "_"
                                       ++ integer_to_list(erlang:unique_integer([positive]))),
    ok = file:write_file(Wrapper, ["#!/bin/sh\nexec ", sh_quote(Exe), " ", sh_quote(Script),
                                   " \"$@\"\n"]),
    ok = file:change_mode(Wrapper, 8#700),
    Wrapper.

sh_quote(S) ->
    "'" ++ lists:flatten(string:replace(S, "'", "'\\''", all)) ++ "'".

start_distribution() ->
    case node() of
        nonode@nohost ->
            _ = os:cmd("epmd -daemon"),  % returns at once if one already runs
            Name = list_to_atom("poolport_eunit_" ++ os:getpid()),
            case net_kernel:start([Name, shortnames]) of
                {ok, _} -> {ok, false};
                {error, Reason} -> {error, Reason}
            end;
        _ ->
            {ok, true}
    end.

stop_distribution(true) -> ok;
stop_distribution(false) -> ok = net_kernel:stop().

%% Helpers.

opts(Extra) ->
    maps:merge(#{config => filename:join(fixtures_dir(), "poolport_test.yaml"),
                 python => os:getenv("POOLPORT_PYTHON", "python3"),
                 env => python_env()},
               Extra).

fixtures_dir() ->
    Candidates = [filename:join(filename:dirname(?FILE), "fixtures"),
                  filename:join(filename:dirname(code:which(?MODULE)), "fixtures"),
                  filename:absname("test/fixtures")],
    case [D || D <- Candidates, filelib:is_regular(filename:join(D, "poolport_test.yaml"))] of
        [Dir | _] -> Dir;
        [] -> error({no_fixtures, Candidates})
    end.

%% Put the repository's Python package first on PYTHONPATH if erlang/ sits
%% in a checkout of it.
python_env() ->
    case repo_root(filename:absname(fixtures_dir())) of
        undefined ->
            [];
        Root ->
            Path = case os:getenv("PYTHONPATH") of
                       false -> Root;
                       "" -> Root;
                       Old -> Root ++ ":" ++ Old
                   end,
            [{"PYTHONPATH", Path}]
    end.

repo_root("/") ->
    undefined;
repo_root(Dir) ->
    case filelib:is_regular(filename:join([Dir, "poolport", "__init__.py"])) andalso
         filelib:is_regular(filename:join(Dir, "pyproject.toml")) of
        true -> Dir;
        false -> repo_root(filename:dirname(Dir))
    end.

tmp_dir() ->
    case os:getenv("TMPDIR") of
        false -> "/tmp";
        "" -> "/tmp";
        Dir -> Dir
    end.

%% Run Fun in a new process; return its result and what was left in its
%% mailbox afterwards.
in_fresh_process(Fun) ->
    {Pid, MRef} = spawn_monitor(fun() ->
        Result = Fun(),
        {messages, Messages} = process_info(self(), messages),
        exit({done, Result, Messages})
    end),
    receive
        {'DOWN', MRef, process, Pid, {done, Result, Messages}} -> {Result, Messages};
        {'DOWN', MRef, process, Pid, Other} -> error({test_process_failed, Other})
    after ?DEADLOCK * 2 -> error(deadlock)
    end.

children(OsPid) ->
    Out = os:cmd("pgrep -P " ++ integer_to_list(OsPid)),
    [list_to_integer(P) || P <- string:lexemes(Out, " \n")].

%% Python processes left behind by a test that killed the dispatcher:
%% kill_no_orphans/0 reports them, the other tests just remove them.
kill_orphans(Pids) ->
    _ = [os:cmd("kill -KILL " ++ integer_to_list(P)) || P <- Pids, os_alive(P)],
    ok.

ps_cmd(OsPid) ->
    string:trim(os:cmd("ps -o args= -p " ++ integer_to_list(OsPid))).

pmap(Fun, List) ->
    pmap(Fun, List, ?DEADLOCK).

%% Fun applied to each element in a process of its own; each result waited
%% for at most Timeout ms.
pmap(Fun, List, Timeout) ->
    Self = self(),
    Refs = [begin
                Ref = make_ref(),
                spawn_link(fun() -> Self ! {Ref, Fun(X)} end),
                Ref
            end || X <- List],
    [receive {Ref, R} -> R after Timeout -> error(deadlock) end || Ref <- Refs].

%% Poll Pred every 10 ms until it is true; fail after Timeout ms.
wait_until(Pred, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    wait_until_(Pred, Deadline).

wait_until_(Pred, Deadline) ->
    case Pred() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> error(wait_until_timeout);
                false ->
                    receive after 10 -> ok end,
                    wait_until_(Pred, Deadline)
            end
    end.

%% kill -0 says whether the OS process exists; a zombie (exited, not yet
%% reaped by its parent) counts as gone.
os_alive(OsPid) ->
    P = integer_to_list(OsPid),
    case os:cmd("kill -0 " ++ P ++ " 2>/dev/null && echo alive") of
        "alive\n" ->
            case string:trim(os:cmd("ps -o stat= -p " ++ P)) of
                "Z" ++ _ -> false;
                _ -> true
            end;
        _ ->
            false
    end.
