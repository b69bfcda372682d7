%% Chaos through the OTP client: many callers, random worker deaths.
%%
%% One pool of ?WORKERS Python workers (a real `python -m poolport serve
%% --reply-tags', handlers in test/fixtures/pp_chaos_erl.py). ?CALLERS Erlang
%% processes each run up to ?OPS_PER_CALLER operations with unique payloads:
%% echo calls (0..100 KB binaries, now and then 1..5 MB, sometimes nested
%% terms; with a timeout or `infinity'), short sleeps, calls that end their
%% worker with os._exit(), calls that time out on the client side, and casts
%% (some of which also kill their worker), and whoami calls that say which
%% worker process answered (workers are found with ps). Meanwhile a killer process SIGKILLs a random
%% worker process (a descendant of the Python dispatcher seen serving, never
%% the dispatcher itself) every 50..300 ms.
%%
%% The invariant: every request gets exactly one reply, its own.
%% <ul>
%% <li>An echo, sleep or whoami call gets `{ok, ItsOwnPayload}' (whoami:
%%   `{ok, {ItsOwnTag, WorkerOsPid}}') or one of the errors a worker death
%%   or a timeout explains: `{server, 4, <<"WorkerCrashed">>}',
%%   `{server, 3, <<"Timeout">>}' or `{error, timeout}' (a call with an
%%   integer timeout only; the client turns Python's Timeout into it).
%%   Anything else (another caller's payload above all, `misaligned',
%%   `port_closed') fails the test, with the details printed.</li>
%% <li>A call to `die' gets `WorkerCrashed'.</li>
%% <li>A call with a short client timeout gets `{error, timeout}' (or one of
%%   the server errors above), and its late reply never shows up later.</li>
%% <li>Every caller finishes, and its mailbox is empty afterwards (no stray
%%   or duplicate reply reached it).</li>
%% <li>Afterwards: most calls succeeded, the killer did kill workers,
%%   `misaligned' and `restarts' are 0 (the dispatcher never died),
%%   `in_flight' drops to 0 (every request was answered), the pool's
%%   counters match what the callers saw (calls, casts, timeouts, errors;
%%   no more late replies dropped than calls timed out), the pool still
%%   answers, and after stop/1 neither the dispatcher nor any of its
%%   descendants is left.</li>
%% </ul>
%%
%% The run is seeded; the seed is printed. Replay one with
%% POOLPORT_CHAOS_SEED=<seed> (timing still differs from run to run).
%% POOLPORT_CHAOS_LOG=INFO (or DEBUG, WARNING, ERROR) shows Python's log;
%% it is CRITICAL by default since every worker death is logged.
-module(poolport_chaos_tests).

-include_lib("eunit/include/eunit.hrl").

-define(M, pp_chaos_erl).
-define(WORKERS, 3).
-define(CALLERS, 100).
-define(OPS_PER_CALLER, 60).
%% Callers start no new operation after this many ms of chaos.
-define(CHAOS_MS, 25000).
%% Timeout of ordinary calls (also sent to Python).
-define(CALL_TIMEOUT, 20000).
%% The killer waits a random time in this range (ms) between kills.
-define(KILL_MIN_MS, 50).
-define(KILL_MAX_MS, 300).
%% Upper bound for waits that only guard against hangs.
-define(DEADLOCK, 30000).

-define(WORKER_CRASHED, {error, {server, 4, <<"WorkerCrashed">>, _, _}}).

chaos_test_() ->
    {timeout, 120, fun chaos/0}.

chaos() ->
    Seed = seed(),
    ?debugFmt("chaos: POOLPORT_CHAOS_SEED=~p (~p callers x ~p ops, ~p workers)",
              [Seed, ?CALLERS, ?OPS_PER_CALLER, ?WORKERS]),
    rand:seed(exsss, {Seed, 0, 1}),
    Blob = rand:bytes(6 bsl 20),
    Started = erlang:monotonic_time(millisecond),
    {ok, Pool} = poolport:start_link(opts()),
    unlink(Pool),
    %% Not a warning for each failed cast (of die, or hit by the killer).
    ok = logger:set_module_level(poolport_server, error),
    try
        run(Pool, Seed, Blob, Started)
    after
        _ = logger:unset_module_level(poolport_server),
        catch poolport:stop(Pool)
    end.

run(Pool, Seed, Blob, Started) ->
    #{os_pid := OsPid, status := running, misaligned := 0} = poolport:info(Pool),
    ?assertEqual({ok, hello}, poolport:call(Pool, ?M, echo, [hello])),
    poolport_e2e_tests:wait_until(fun() -> length(workers(OsPid)) =:= ?WORKERS end, ?DEADLOCK),
    Info0 = poolport:info(Pool),
    Self = self(),
    Killer = spawn_link(fun() -> killer(Self, OsPid, Seed) end),
    ChaosEnd = erlang:monotonic_time(millisecond) + ?CHAOS_MS,
    Callers = [spawn_monitor(fun() -> caller(Self, Pool, Killer, Id, Seed, Blob, ChaosEnd) end)
               || Id <- lists:seq(1, ?CALLERS)],
    Results = collect(Callers, ChaosEnd + ?CALL_TIMEOUT + 5000),
    Killer ! {stop, Self},
    Kills = receive {killer, Killer, K} -> K after ?DEADLOCK -> error(killer_hangs) end,
    ChaosDone = erlang:monotonic_time(millisecond),
    Counts = lists:foldl(fun({_, #{counts := C}}, Acc) -> merge(C, Acc) end, #{}, Results),
    Bad = lists:append([B || {_, #{bad := B}} <- Results]),
    Stray = [{Id, M} || {Id, #{mailbox := M}} <- Results, M =/= []],
    MaxLatency = lists:max([L || {_, #{max_latency := L}} <- Results]),
    %% The pool still answers, and nothing was ever out of step.
    ?assertEqual({ok, {after_chaos, Blob}}, poolport:call(Pool, ?M, echo, [{after_chaos, Blob}],
                                                          ?CALL_TIMEOUT)),
    poolport_e2e_tests:wait_until(fun() -> maps:get(in_flight, poolport:info(Pool)) =:= 0 end, ?DEADLOCK),
    Info = poolport:info(Pool),
    {ok, Server} = poolport:call(Pool, '$poolport', info, [], ?CALL_TIMEOUT),
    ?debugFmt("chaos: ~p ms of chaos, ~p worker kills, max call latency ~p ms~n"
              "  replies: ~p~n"
              "  pool: ~p~n"
              "  server: ~p",
              [ChaosDone - Started, Kills, MaxLatency, lists:sort(maps:to_list(Counts)),
               maps:with([calls, casts, errors, timeouts, dropped, restarts, misaligned,
                          in_flight, waiting, status], Info),
               maps:with([worker_deaths, reruns, abandoned, timeouts], Server)]),
    [?debugFmt("chaos: WRONG REPLIES (seed ~p), ~p in all, the first ones:~n~p",
               [Seed, length(Bad), lists:sublist(Bad, 20)]) || Bad =/= []],
    [?debugFmt("chaos: STRAY MESSAGES (seed ~p):~n~p", [Seed, Stray]) || Stray =/= []],
    %% No caller got anything but its own reply or an allowed error ...
    ?assertEqual({bad_replies, []}, {bad_replies, lists:sublist(Bad, 20)}),
    %% ... nor a message it did not wait for.
    ?assertEqual({stray_messages, []}, {stray_messages, Stray}),
    ?assertMatch(#{misaligned := 0, restarts := 0, status := running, waiting := 0}, Info),
    %% The pool's counters agree with what the callers saw: each call was
    %% answered once (in_flight is 0), to its caller or, after the caller's
    %% own timeout, dropped.
    Sum = fun(Pred) -> lists:sum([N || {Key, N} <- maps:to_list(Counts), Pred(Key)]) end,
    CallsMade = Sum(fun({K, _}) -> lists:member(K, [echo, sleep, whoami, die, late]) end),
    CastsMade = Sum(fun({K, _}) -> lists:member(K, [cast, cast_die]) end),
    CallErrors = Sum(fun({K, O}) -> lists:member(K, [echo, sleep, whoami, die, late]) andalso O =/= ok end),
    TimeoutsSeen = Sum(fun({_, O}) -> O =:= timeout end),
    Delta = maps:map(fun(K, V) -> V - maps:get(K, Info0) end,
                     maps:with([calls, casts, errors, timeouts, dropped], Info)),
    #{calls := DCalls, casts := DCasts, errors := DErrors, timeouts := DTimeouts,
      dropped := DDropped} = Delta,
    ?assertEqual({calls, CallsMade + 1}, {calls, DCalls}),
    ?assertEqual({casts, CastsMade}, {casts, DCasts}),
    ?assertEqual({timeouts, TimeoutsSeen}, {timeouts, DTimeouts}),
    ?assert(DDropped =< DTimeouts),
    %% Every failed cast (at least those of die) is counted as an error too.
    CastDies = maps:get({cast_die, ok}, Counts, 0),
    ?assert(DErrors >= CallErrors + CastDies andalso DErrors =< CallErrors + CastsMade),
    Ok = maps:get({echo, ok}, Counts, 0) + maps:get({sleep, ok}, Counts, 0),
    Answered = lists:sum([N || {{Kind, _}, N} <- maps:to_list(Counts),
                               lists:member(Kind, [echo, sleep])]),
    ?assert(Answered >= ?CALLERS * 10),
    %% Most calls succeed: a death costs the call it interrupts, not those
    %% queued behind it (they are re-run).
    ?assert(Ok >= Answered * 8 div 10),
    ?assert(Kills >= 10),
    %% Deaths did happen, through the killer and the die calls.
    ?assert(maps:get(worker_deaths, Server) >= Kills div 2),
    %% Stop: the dispatcher and all its descendants go away.
    Descendants = descendants(OsPid),
    ?assertNotEqual([], Descendants),
    ok = poolport:stop(Pool),
    ?assertNot(poolport_e2e_tests:os_alive(OsPid)),
    Left = try
               poolport_e2e_tests:wait_until(fun() -> not lists:any(fun poolport_e2e_tests:os_alive/1, Descendants) end, 15000),
               []
           catch
               error:wait_until_timeout -> [{P, ps_cmd(P)} || P <- Descendants, poolport_e2e_tests:os_alive(P)]
           end,
    _ = [os:cmd("kill -KILL " ++ integer_to_list(P)) || {P, _} <- Left],
    ?assertEqual({left_after_stop, []}, {left_after_stop, Left}),
    ?debugFmt("chaos: done in ~p ms", [erlang:monotonic_time(millisecond) - Started]).

%% Wait for every caller's report; a caller that crashed or hangs fails the test.
collect(Callers, Deadline) ->
    collect(Callers, Deadline, []).

collect([], _Deadline, Acc) ->
    lists:sort(Acc);
collect(Callers, Deadline, Acc) ->
    Wait = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {done, Pid, Id, Report} ->
            {value, {Pid, MRef}, Rest} = lists:keytake(Pid, 1, Callers),
            receive {'DOWN', MRef, process, Pid, normal} -> ok
            after ?DEADLOCK -> error({caller_did_not_exit, Id})
            end,
            collect(Rest, Deadline, [{Id, Report} | Acc]);
        {'DOWN', _MRef, process, Pid, Reason} ->
            error({caller_crashed, Pid, Reason})
    after Wait ->
        error({callers_hang, [{Pid, catch process_info(Pid, [current_stacktrace, messages])}
                              || {Pid, _} <- lists:sublist(Callers, 3)],
               length(Callers)})
    end.

%% Callers.

caller(Parent, Pool, Killer, Id, Seed, Blob, ChaosEnd) ->
    rand:seed(exsss, {Seed, Id, 2}),
    put(killer, Killer),
    State = ops(Pool, Id, Blob, ChaosEnd, 1, #{counts => #{}, bad => [], max_latency => 0}),
    {messages, Mailbox} = process_info(self(), messages),
    Parent ! {done, self(), Id, State#{mailbox => [summary(M) || M <- Mailbox]}}.

ops(_Pool, _Id, _Blob, _ChaosEnd, N, State) when N > ?OPS_PER_CALLER ->
    State;
ops(Pool, Id, Blob, ChaosEnd, N, State) ->
    case erlang:monotonic_time(millisecond) > ChaosEnd of
        true ->
            State;
        false ->
            T0 = erlang:monotonic_time(millisecond),
            {Kind, Outcome, Bad} = op(rand:uniform(1000), Pool, Id, N, Blob),
            Latency = erlang:monotonic_time(millisecond) - T0,
            #{counts := C, bad := B, max_latency := L} = State,
            State1 = State#{counts := maps:update_with({Kind, Outcome}, fun(X) -> X + 1 end, 1, C),
                            bad := B ++ [{caller, Id, op, N, Kind, Bad} || Bad =/= ok],
                            max_latency := max(L, Latency)},
            ops(Pool, Id, Blob, ChaosEnd, N + 1, State1)
    end.

%% One operation, picked by R in 1..1000: {Kind, Outcome, ok | WhatWasWrong}.
%% 70% echo, 9% sleep, 5% whoami, 0.4% die, 0.2% client timeout, 15.3% cast,
%% 0.1% cast of die.
op(R, Pool, Id, N, Blob) when R =< 700 ->
    Payload = payload(Id, N, Blob),
    Timeout = case rand:uniform(10) of 1 -> infinity; _ -> ?CALL_TIMEOUT end,
    Reply = poolport:call(Pool, ?M, echo, [Payload], Timeout),
    check(echo, Reply, Payload, Timeout);
op(R, Pool, Id, N, _Blob) when R =< 790 ->
    Tag = {Id, N, sleep},
    Reply = poolport:call(Pool, ?M, sleep_ms, [rand:uniform(21) - 1, Tag], ?CALL_TIMEOUT),
    check(sleep, Reply, Tag, ?CALL_TIMEOUT);
op(R, Pool, Id, N, _Blob) when R =< 840 ->
    %% Which worker answered: the killer only kills processes seen serving.
    Tag = {Id, N, whoami},
    case poolport:call(Pool, ?M, whoami, [Tag], ?CALL_TIMEOUT) of
        {ok, {Tag, OsPid}} when is_integer(OsPid) ->
            get(killer) ! {serving, OsPid},
            {whoami, ok, ok};
        Reply ->
            case check(whoami, Reply, Tag, ?CALL_TIMEOUT) of
                {_, other, _} -> {whoami, other, {expected, {ok, {Tag, os_pid}}, got, summary(Reply)}};
                Allowed -> Allowed
            end
    end;
op(R, Pool, _Id, _N, _Blob) when R =< 844 ->
    case poolport:call(Pool, ?M, die, [], ?CALL_TIMEOUT) of
        ?WORKER_CRASHED -> {die, crashed, ok};
        Other -> {die, other, {expected_worker_crashed, summary(Other)}}
    end;
op(R, Pool, Id, N, _Blob) when R =< 846 ->
    %% Gives up long before the worker answers (Python also stops it at
    %% 50 ms, by killing the worker); the late reply must never show up.
    Tag = {Id, N, late},
    case poolport:call(Pool, ?M, sleep_ms, [500, Tag], 50) of
        {error, timeout} -> {late, timeout, ok};
        {error, {server, 3, <<"Timeout">>, _, _}} -> {late, server_timeout, ok};
        ?WORKER_CRASHED -> {late, crashed, ok};
        Other -> {late, other, {expected_timeout, summary(Other)}}
    end;
op(R, Pool, Id, N, _Blob) when R =< 999 ->
    {cast, poolport:cast(Pool, ?M, sink, [{Id, N, cast}]), ok};
op(_R, Pool, _Id, _N, _Blob) ->
    {cast_die, poolport:cast(Pool, ?M, die, []), ok}.

check(Kind, {ok, Expected}, Expected, _Timeout) ->
    {Kind, ok, ok};
check(Kind, ?WORKER_CRASHED, _Expected, _Timeout) ->
    {Kind, crashed, ok};
check(Kind, {error, {server, 3, <<"Timeout">>, _, _}}, _Expected, _Timeout) ->
    {Kind, server_timeout, ok};
check(Kind, {error, timeout}, _Expected, Timeout) when is_integer(Timeout) ->
    {Kind, timeout, ok};
check(Kind, Reply, Expected, _Timeout) ->
    {Kind, other, {expected, summary({ok, Expected}), got, summary(Reply)}}.

%% A unique payload, {CallerId, N, Data}: Data is mostly a binary of
%% 0..100 KB (log-uniform size, so tiny calls that travel to a worker in
%% runs of many are common too), 1% 1..5 MB, 10% a nested term.
payload(Id, N, Blob) ->
    case rand:uniform(1000) of
        X when X =< 10 -> {Id, N, chunk(Id, N, Blob, 1 bsl 20 + rand:uniform(4 bsl 20))};
        X when X =< 110 ->
            {Id, N, #{list => [{Id, N, I, float(I)} || I <- lists:seq(1, rand:uniform(200))],
                      atom => ok, neg => -N, big => N bsl 70, bin => chunk(Id, N, Blob, 100)}};
        _ -> {Id, N, chunk(Id, N, Blob, trunc(math:pow(100 * 1024 + 1, rand:uniform())) - 1)}
    end.

%% Size bytes from a random place in Blob, marked with the caller and the
%% operation (when there is room for the mark).
chunk(Id, N, Blob, Size) ->
    Start = rand:uniform(byte_size(Blob) - Size + 1) - 1,
    case Size >= 8 of
        true ->
            <<_:8/binary, Rest/binary>> = binary:part(Blob, Start, Size),
            <<Id:32, N:32, Rest/binary>>;
        false ->
            binary:copy(binary:part(Blob, Start, Size))
    end.

%% A short description of a reply or message, naming whose payload it holds.
summary({ok, {Id, N, Bin}}) when is_binary(Bin) ->
    {ok, {caller, Id, op, N, bytes, byte_size(Bin), mark, binary:part(Bin, 0, min(8, byte_size(Bin)))}};
summary({ok, {Id, N, Map}}) when is_map(Map) ->
    {ok, {caller, Id, op, N, map}};
summary({ok, {Id, N, Tag}}) when is_atom(Tag) ->
    {ok, {caller, Id, op, N, Tag}};
summary({error, {Type, Code, Class, Detail, _Trace}}) ->
    {error, {Type, Code, Class, Detail}};
summary({Alias, Reply}) when is_reference(Alias) ->
    {reply_message, summary(Reply)};
summary(Other) ->
    lists:flatten(io_lib:format("~P", [Other, 12])).

%% The killer: SIGKILL a random worker every 50..300 ms.
%%
%% Only worker processes that callers saw answering a call (whoami) are
%% candidates. A slot whose new process dies five times in a row before it
%% is sent any request ends the whole Python server (its guard against a
%% worker that cannot start, see poolport/server/dispatcher.py); on a loaded
%% machine a new process can take a second to be ready, so killing any
%% young process could end the server rather than test worker deaths.

killer(Parent, OsPid, Seed) ->
    rand:seed(exsss, {Seed, 0, 3}),
    killer(Parent, OsPid, #{}, next_kill(), 0).

next_kill() ->
    erlang:monotonic_time(millisecond) + ?KILL_MIN_MS + rand:uniform(?KILL_MAX_MS - ?KILL_MIN_MS + 1) - 1.

killer(Parent, OsPid, Serving, At, Kills) ->
    receive
        {stop, Parent} ->
            Parent ! {killer, self(), Kills};
        {serving, P} ->
            killer(Parent, OsPid, Serving#{P => true}, At, Kills)
    after max(0, At - erlang:monotonic_time(millisecond)) ->
        Workers = workers(OsPid),
        Serving1 = maps:with(Workers, Serving),
        case lists:sort(maps:keys(Serving1)) of
            [] ->
                killer(Parent, OsPid, Serving1, next_kill(), Kills);
            Candidates ->
                Victim = lists:nth(rand:uniform(length(Candidates)), Candidates),
                ?assertNotEqual(OsPid, Victim),
                _ = os:cmd("kill -KILL " ++ integer_to_list(Victim) ++ " 2>/dev/null"),
                killer(Parent, OsPid, maps:remove(Victim, Serving1), next_kill(), Kills + 1)
        end
    end.

%% Worker processes: the descendants of the dispatcher, except the
%% resource trackers of loky and multiprocessing.
workers(OsPid) ->
    [P || {P, Args} <- descendants_args(OsPid), string:find(Args, "resource_tracker") =:= nomatch].

descendants(OsPid) ->
    [P || {P, _} <- descendants_args(OsPid)].

descendants_args(OsPid) ->
    Rows = [case string:lexemes(Line, " ") of
                [Pid, PPid | Args] -> {list_to_integer(Pid), list_to_integer(PPid),
                                       lists:join(" ", Args)};
                _ -> skip
            end || Line <- string:lexemes(os:cmd("ps -e -o pid= -o ppid= -o args="), "\n")],
    Procs = [Row || {_, _, _} = Row <- Rows],
    descend([OsPid], Procs, []).

descend([], _Procs, Acc) ->
    lists:reverse(Acc);
descend([Parent | More], Procs, Acc) ->
    Children = [{P, lists:flatten(A)} || {P, PP, A} <- Procs, PP =:= Parent],
    descend(More ++ [P || {P, _} <- Children], Procs, lists:reverse(Children) ++ Acc).

%% Helpers.

seed() ->
    case os:getenv("POOLPORT_CHAOS_SEED") of
        S when S =:= false; S =:= "" -> erlang:phash2({os:timestamp(), os:getpid()});
        S -> list_to_integer(S)
    end.

merge(A, B) ->
    maps:fold(fun(K, V, Acc) -> maps:update_with(K, fun(X) -> X + V end, V, Acc) end, B, A).

opts() ->
    LogLevel = case os:getenv("POOLPORT_CHAOS_LOG") of
                   L when L =:= false; L =:= "" -> "CRITICAL";
                   L -> L
               end,
    #{config => undefined,
      python => os:getenv("POOLPORT_PYTHON", "python3"),
      env => poolport_e2e_tests:python_env(),
      args => ["--workers", integer_to_list(?WORKERS), "--module", atom_to_list(?M),
               "--python-path", filename:absname(poolport_e2e_tests:fixtures_dir()), "--log-level", LogLevel]}.

ps_cmd(OsPid) ->
    string:trim(os:cmd("ps -o args= -p " ++ integer_to_list(OsPid))).
