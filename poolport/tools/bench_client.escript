#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noshell
%% The OTP-client load generator of `poolport bench' (workload
%% `client'): the same tiny calls through a raw port and through the poolport
%% OTP application (erlang/ in the repository, compiled into Ebin by the
%% bench), in one VM, on two servers started with the same arguments.
%%
%%   escript bench_client.escript Ebin Calls Rounds -- Python ServeArg...
%%
%% The call is `poolport.demo_handlers:echo({I, <<"abc">>})'. Rounds times,
%% raw then pool:
%%   raw:pipe      one process keeps 512 requests in flight on a raw
%%                 `{packet, 4}' port to `Python -m poolport serve ServeArg...'
%%   raw:50        the same with 50 in flight: what 50 lock-step callers could
%%                 get from this server if the client cost nothing
%%   raw:lock      one process in lock-step on that port, every round trip timed
%%   pool:lock     one caller of `poolport:call/4' in lock-step, timed
%%   pool:P        P = 50 and 500 processes calling `poolport:call/4' in
%%                 lock-step, Calls calls in all
%% Then `soak': 10 * Calls calls from 50 processes, with the pool process's
%% memory (bytes, after a garbage collection) before and after.
%%
%% Every reply is checked. Output on stdout, one line each:
%%   result Phase calls N us Microseconds p50 Us p99 Us   (best round; "-" when untimed)
%%   memory pool before Bytes after Bytes calls N
%%   done
%% or a line starting with "error" and exit status 1.
-mode(compile).

-define(M, 'poolport.demo_handlers').
-define(WINDOW, 512).

main(Args) ->
    case lists:splitwith(fun(A) -> A =/= "--" end, Args) of
        {[Ebin, Calls, Rounds], ["--", Python | ServeArgs]} ->
            try
                run(Ebin, int(Calls), int(Rounds), Python, ServeArgs)
            catch
                Class:Reason:Stack -> fail("~p:~p ~p", [Class, Reason, Stack])
            end;
        _ ->
            io:format("usage: bench_client.escript Ebin Calls Rounds -- Python ServeArg...~n"),
            halt(2)
    end.

run(Ebin, Calls, Rounds, Python, ServeArgs) ->
    true = code:add_patha(Ebin),
    {ok, _} = application:ensure_all_started(poolport),
    Port = open_port({spawn_executable, Python},
                     [{args, ["-m", "poolport", "serve", "--packet", "4" | ServeArgs]},
                      {packet, 4}, binary, exit_status]),
    {ok, Pool} = poolport:start_link(#{config => undefined, python => Python, args => ServeArgs,
                                       start_timeout => 120000}),
    %% Warm both: every worker answers, the code is hot.
    _ = raw_pipe(Port, 2000, ?WINDOW), _ = raw_lock(Port, 500),
    _ = pool_lock(Pool, 500), _ = pool_callers(Pool, 50, 2000),
    Lock = max(1, Calls div 10),
    Runs = [[{"raw:pipe", Calls, raw_pipe(Port, Calls, ?WINDOW)},
             {"raw:50", Calls, raw_pipe(Port, Calls, 50)},
             {"raw:lock", Lock, raw_lock(Port, Lock)},
             {"pool:lock", Lock, pool_lock(Pool, Lock)},
             {"pool:50", Calls, pool_callers(Pool, 50, Calls)},
             {"pool:500", Calls, pool_callers(Pool, 500, Calls)}]
            || _ <- lists:seq(1, Rounds)],
    [begin
         Same = [R || Round <- Runs, {P, _, _} = R <- Round, P =:= Phase],
         {_, N, {Us, Lat}} = hd(lists:keysort(1, [{Us, N, {Us, Lat}} || {_, N, {Us, Lat}} <- Same])),
         {P50, P99} = percentiles(Lat),
         io:format("result ~s calls ~b us ~b p50 ~s p99 ~s~n", [Phase, N, Us, P50, P99])
     end || {Phase, _, _} <- hd(Runs)],
    Soak = 10 * Calls,
    Before = pool_memory(Pool),
    _ = pool_callers(Pool, 50, Soak),
    After = pool_memory(Pool),
    io:format("memory pool before ~b after ~b calls ~b~n", [Before, After, Soak]),
    ok = poolport:stop(Pool),
    port_close(Port),
    io:format("done~n"),
    halt(0).

pool_memory(Pool) ->
    true = erlang:garbage_collect(Pool),
    {memory, Bytes} = erlang:process_info(Pool, memory),
    Bytes.

tiny(I) -> term_to_binary({call, ?M, echo, [{I, <<"abc">>}]}).

check(I, {I, <<"abc">>}) -> ok;
check(I, Other) -> fail("call ~b: ~p", [I, Other]).

raw_reply(Port) ->
    receive
        {Port, {data, Data}} ->
            case binary_to_term(Data) of
                {reply, R} -> R;
                Other -> fail("raw reply ~p", [Other])
            end;
        {Port, {exit_status, S}} -> fail("server exited with ~b", [S])
    after 60000 -> fail("no reply for 60 s", [])
    end.

%% Window requests in flight from one process; refilled as replies come.
raw_pipe(Port, Calls, Window) ->
    T0 = now_us(),
    First = min(Window, Calls),
    [port_command(Port, tiny(I)) || I <- lists:seq(1, First)],
    pipe_loop(Port, 1, First + 1, Calls),
    {now_us() - T0, []}.

pipe_loop(_Port, Next, _Send, Calls) when Next > Calls -> ok;
pipe_loop(Port, Next, Send, Calls) ->
    check(Next, raw_reply(Port)),
    Send1 = case Send =< Calls of
                true -> port_command(Port, tiny(Send)), Send + 1;
                false -> Send
            end,
    pipe_loop(Port, Next + 1, Send1, Calls).

raw_lock(Port, Calls) ->
    timed(fun(I) -> port_command(Port, tiny(I)), check(I, raw_reply(Port)) end, Calls).

pool_lock(Pool, Calls) ->
    timed(fun(I) -> {ok, R} = poolport:call(Pool, ?M, echo, [{I, <<"abc">>}]), check(I, R) end, Calls).

timed(Fun, Calls) ->
    T0 = now_us(),
    Lat = [begin
               T = erlang:monotonic_time(nanosecond),
               Fun(I),
               erlang:monotonic_time(nanosecond) - T
           end || I <- lists:seq(1, Calls)],
    {now_us() - T0, Lat}.

%% Procs processes in lock-step, Calls calls in all, handed out by a counter.
pool_callers(Pool, Procs, Calls) ->
    Next = atomics:new(1, []),
    Self = self(),
    T0 = now_us(),
    Pids = [spawn_link(fun() -> caller(Pool, Next, Calls), Self ! {done, self()} end)
            || _ <- lists:seq(1, Procs)],
    [receive {done, P} -> ok end || P <- Pids],
    {now_us() - T0, []}.

caller(Pool, Next, Calls) ->
    case atomics:add_get(Next, 1, 1) of
        I when I =< Calls ->
            case poolport:call(Pool, ?M, echo, [{I, <<"abc">>}]) of
                {ok, R} -> check(I, R), caller(Pool, Next, Calls);
                Other -> fail("pool call ~b: ~p", [I, Other])
            end;
        _ ->
            ok
    end.

percentiles([]) -> {"-", "-"};
percentiles(Lat) ->
    S = lists:sort(Lat),
    N = length(S),
    At = fun(Q) -> lists:nth(max(1, min(N, round(Q * N))), S) div 1000 end,
    {integer_to_list(At(0.5)), integer_to_list(At(0.99))}.

now_us() -> erlang:monotonic_time(microsecond).

int(S) -> list_to_integer(S).

fail(Fmt, Args) ->
    io:format("error " ++ Fmt ++ "~n", Args),
    halt(1).
