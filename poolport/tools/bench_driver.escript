#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noshell
%% The load generator of `poolport bench`: one Erlang VM opens ONE
%% port to a server (`poolport serve` or the single-process reference
%% `python -m poolport.tools.bench_reference`), exactly as an application would
%% (spawn_executable, {packet, 4}, binary, exit_status), warms it up and runs
%% the phases given on the command line, in order, on the same port.
%%
%%   escript bench_driver.escript Phase... -- Executable Arg...
%%
%% Phases (every reply is checked against what was sent; a wrong reply stops
%% the run with "error ..."):
%%   pipe:echo:Window:Calls      tiny calls, {call, 'poolport.demo_handlers',
%%                               echo, [{I, <<"abc">>}]}, from one process
%%                               that keeps Window requests in flight: it
%%                               sends Window at once, then one more for each
%%                               reply (the model of many concurrent callers
%%                               behind a pipelining client such as the
%%                               poolport OTP application)
%%   lock:echo:Calls             the same tiny call, one caller in lock-step
%%                               (send, wait for the reply, send the next);
%%                               every round trip is timed (p50/p99/mean)
%%   big:Bytes:Calls             echo of a Bytes-long random binary, one
%%                               caller in lock-step (a full round trip each)
%%   pipe:burn:Steps:Window:Calls   CPU-bound burn(Steps), pipelined window
%%   callers:burn:Steps:Procs:Calls CPU-bound burn(Steps) from Procs Erlang
%%                               processes, each in lock-step; they reach the
%%                               port through one small owner process that
%%                               writes their requests and keeps a FIFO of
%%                               callers to hand each reply to (replies come
%%                               back in request order)
%%   stream:Items:Bytes:Window   a stream of Items binaries of Bytes bytes
%%                               (poolport.demo_handlers:chunks/2, window
%%                               Window, credit handed back every half
%%                               window); meanwhile one tiny echo call at a
%%                               time (one per Items/200 items received),
%%                               each timed: the latency of calls during a
%%                               stream (poolport only: the reference has no
%%                               streams). "calls" counts items.
%%   burst:burn:Steps:Calls      Calls CPU-bound burn(Steps) sent at once to a
%%                               pool that has never run burn: no warm-up, so
%%                               how the first burst spreads is measured
%%   mix:burn:Steps:Tiny:Calls   Calls CPU-bound burn(Steps), each after Tiny
%%                               tiny echo calls, all sent at once from one
%%                               process; "calls" counts the burn calls (how
%%                               heavy calls spread while tiny ones flow)
%% Each phase but burst first runs an unmeasured warm-up slice of itself (a
%% tenth of its calls, at most 2000 and at least 1), then the measured calls.
%%
%% Before the phases the driver asks {call, '$poolport', info, []} for the
%% worker count W and calls poolport.demo_handlers:whoami(20) until W distinct
%% worker pids have answered, so start-up is never timed.
%%
%% Output on stdout, one line each, fields separated by spaces:
%%   warm workers W pids P
%%   result Phase calls N us Microseconds p50 Us p99 Us mean Us
%%   (latency fields are "-" for phases that do not time single calls)
%%   done
%% or a line starting with "error" and exit status 1.
-mode(compile).

main(Args) ->
    case lists:splitwith(fun(A) -> A =/= "--" end, Args) of
        {Phases, ["--", Exe | ExeArgs]} when Phases =/= [] ->
            run(Phases, Exe, ExeArgs);
        _ ->
            io:format("usage: bench_driver.escript Phase... -- Executable Arg...~n"),
            halt(2)
    end.

run(Phases, Exe, ExeArgs) ->
    Port = open_port({spawn_executable, Exe},
                     [{args, ExeArgs}, {packet, 4}, binary, exit_status]),
    {Workers, Pids} = warm_up(Port, 0),
    io:format("warm workers ~b pids ~b~n", [Workers, length(Pids)]),
    lists:foreach(fun(P) -> phase(Port, P) end, Phases),
    io:format("done~n"),
    port_close(Port),
    halt(0).

%% ------------------------------------------------------------------ warm-up

warm_up(Port, Tries) when Tries < 200 ->
    port_command(Port, term_to_binary({call, '$poolport', info, []})),
    #{workers := Workers} = reply(Port),
    N = 4 * Workers,
    Req = term_to_binary({call, 'poolport.demo_handlers', whoami, [20]}),
    [port_command(Port, Req) || _ <- lists:seq(1, N)],
    Pids = lists:usort([reply(Port) || _ <- lists:seq(1, N)]),
    case length(Pids) >= Workers of
        true -> {Workers, Pids};
        false -> warm_up(Port, Tries + 1)
    end;
warm_up(_Port, _) ->
    fail("not every worker answered during warm-up", []).

%% ------------------------------------------------------------------ phases

phase(Port, Spec) ->
    Parts = string:split(Spec, ":", all),
    {Fun, Calls} = phase_fun(Port, Parts),
    _ = case Parts of
            ["burst" | _] -> [];
            _ -> Fun(max(1, min(2000, Calls div 10)))
        end,
    T0 = erlang:monotonic_time(microsecond),
    Lat = Fun(Calls),
    T1 = erlang:monotonic_time(microsecond),
    {P50, P99, Mean} = stats(Lat),
    io:format("result ~s calls ~b us ~b p50 ~s p99 ~s mean ~s~n",
              [Spec, Calls, T1 - T0, P50, P99, Mean]).

phase_fun(Port, ["pipe", "echo", W, C]) ->
    {fun(N) -> pipelined(Port, fun tiny/1, fun tiny_ok/2, int(W), N) end, int(C)};
phase_fun(Port, ["lock", "echo", C]) ->
    {fun(N) -> lockstep(Port, fun tiny/1, fun tiny_ok/2, N) end, int(C)};
phase_fun(Port, ["big", B, C]) ->
    Bin = crypto:strong_rand_bytes(int(B)),
    Req = term_to_binary({call, 'poolport.demo_handlers', echo, [Bin]}),
    Make = fun(_) -> Req end,
    Check = fun(_, R) -> R =:= Bin end,
    {fun(N) -> big(Port, Make, Check, N) end, int(C)};
phase_fun(Port, ["pipe", "burn", S, W, C]) ->
    {Make, Check} = burn(int(S)),
    {fun(N) -> pipelined(Port, Make, Check, int(W), N) end, int(C)};
phase_fun(Port, ["burst", "burn", S, C]) ->
    {Make, Check} = burn(int(S)),
    {fun(N) -> pipelined(Port, Make, Check, N, N) end, int(C)};
phase_fun(Port, ["mix", "burn", S, T, C]) ->
    {Make, Check} = burn(int(S)),
    {fun(N) -> mixed(Port, Make, Check, int(T), N) end, int(C)};
phase_fun(Port, ["callers", "burn", S, P, C]) ->
    {Make, Check} = burn(int(S)),
    {fun(N) -> callers(Port, Make, Check, int(P), N) end, int(C)};
phase_fun(Port, ["stream", C, B, W]) ->
    {fun(N) -> stream(Port, N, int(B), int(W)) end, int(C)};
phase_fun(_Port, Other) ->
    fail("unknown phase ~p", [Other]).

tiny(I) -> term_to_binary({call, 'poolport.demo_handlers', echo, [{I, <<"abc">>}]}).
tiny_ok(I, R) -> R =:= {I, <<"abc">>}.

burn(Steps) ->
    Req = term_to_binary({call, 'poolport.demo_handlers', burn, [Steps]}),
    Expected = burn_result(Steps),
    {fun(_) -> Req end, fun(_, R) -> R =:= Expected end}.

burn_result(Steps) -> burn_result(0, 0, Steps).
burn_result(Acc, I, Steps) when I < Steps -> burn_result((Acc * 31 + I) rem 1000003, I + 1, Steps);
burn_result(Acc, _, _) -> Acc.

%% Window requests in flight from one process; refilled as replies come.
pipelined(Port, Make, Check, Window, Calls) ->
    First = min(Window, Calls),
    [port_command(Port, Make(I)) || I <- lists:seq(1, First)],
    pipe_loop(Port, Make, Check, 1, First + 1, Calls),
    [].

pipe_loop(_Port, _Make, _Check, Next, _Send, Calls) when Next > Calls -> ok;
pipe_loop(Port, Make, Check, Next, Send, Calls) ->
    R = reply(Port),
    check(Check, Next, R),
    Send1 = case Send =< Calls of
                true -> port_command(Port, Make(Send)), Send + 1;
                false -> Send
            end,
    pipe_loop(Port, Make, Check, Next + 1, Send1, Calls).

%% Calls heavy requests, each after Tiny tiny ones, all at once; every reply checked in order.
mixed(Port, Make, Check, Tiny, Calls) ->
    [begin
         [port_command(Port, tiny(Tiny * I + K)) || K <- lists:seq(1, Tiny)],
         port_command(Port, Make(I))
     end || I <- lists:seq(1, Calls)],
    lists:foreach(fun(I) ->
                          [tiny_check(Tiny * I + K, reply(Port)) || K <- lists:seq(1, Tiny)],
                          check(Check, I, reply(Port))
                  end, lists:seq(1, Calls)),
    [].

tiny_check(I, R) -> check(fun tiny_ok/2, I, R).

%% One caller, lock-step; every round trip timed in microseconds.
lockstep(Port, Make, Check, Calls) ->
    lock_loop(Port, Make, Check, 1, Calls, []).

lock_loop(_Port, _Make, _Check, I, Calls, Acc) when I > Calls -> Acc;
lock_loop(Port, Make, Check, I, Calls, Acc) ->
    Req = Make(I),
    T0 = erlang:monotonic_time(nanosecond),
    port_command(Port, Req),
    R = reply(Port),
    T1 = erlang:monotonic_time(nanosecond),
    check(Check, I, R),
    lock_loop(Port, Make, Check, I + 1, Calls, [T1 - T0 | Acc]).

%% Lock-step too, but without keeping latencies around.
big(Port, Make, Check, Calls) ->
    lists:foreach(fun(I) ->
                          port_command(Port, Make(I)),
                          check(Check, I, reply(Port))
                  end, lists:seq(1, Calls)),
    [].

%% Procs processes, each in lock-step, through an owner process with a FIFO.
callers(Port, Make, Check, Procs, Calls) ->
    Self = self(),
    Owner = spawn_link(fun() -> owner(Port, queue:new()) end),
    erlang:port_connect(Port, Owner),
    unlink(Port),
    Shares = [Calls div Procs + (case K =< Calls rem Procs of true -> 1; false -> 0 end)
              || K <- lists:seq(1, Procs)],
    Refs = [begin
                Ref = make_ref(),
                spawn_link(fun() ->
                                   caller(Owner, Make, Check, Share),
                                   Self ! {Ref, done}
                           end),
                Ref
            end || Share <- Shares],
    [receive {Ref, done} -> ok end || Ref <- Refs],
    Owner ! {give_back, Self},
    receive {Owner, given_back} -> ok end,
    [].

caller(_Owner, _Make, _Check, 0) -> ok;
caller(Owner, Make, Check, N) ->
    Owner ! {call, self(), Make(N)},
    receive {reply, R} -> check(Check, N, R) end,
    caller(Owner, Make, Check, N - 1).

owner(Port, Q) ->
    receive
        {call, From, Req} ->
            port_command(Port, Req),
            owner(Port, queue:in(From, Q));
        {Port, {data, Data}} ->
            {{value, From}, Q1} = queue:out(Q),
            From ! {reply, unwrap(Data)},
            owner(Port, Q1);
        {Port, {exit_status, S}} ->
            fail("server exited with status ~b", [S]);
        {give_back, To} ->
            erlang:port_connect(Port, To),
            unlink(Port),
            To ! {self(), given_back}
    end.

%% A stream of N items, with timed tiny calls in between; the calls' latencies.
stream(Port, N, Size, Window) ->
    port_command(Port, term_to_binary({stream, 'poolport.demo_handlers', chunks, [N, Size],
                                       [{window, Window}]})),
    Sid = case frame(Port) of
              {stream, Id} -> Id;
              Other -> fail("unexpected stream start ~P", [Other, 12])
          end,
    Every = max(1, N div 200),
    stream_loop(Port, Sid, Size, max(1, Window div 2), Every, 0, 0, none, 0, []).

stream_loop(Port, Sid, Size, Half, Every, Got, Owed, Probe, I, Lat) ->
    case frame(Port) of
        {stream_item, Sid, Item} when byte_size(Item) =:= Size ->
            Owed1 = case Owed + 1 of
                        Half -> port_command(Port, term_to_binary({stream_credit, Sid, Half})), 0;
                        O -> O
                    end,
            Probe1 = case Probe =:= none andalso (Got + 1) rem Every =:= 0 of
                         true ->
                             port_command(Port, tiny(I)),
                             {I, erlang:monotonic_time(nanosecond)};
                         false -> Probe
                     end,
            stream_loop(Port, Sid, Size, Half, Every, Got + 1, Owed1, Probe1, I + 1, Lat);
        {stream_end, Sid} ->
            Lat1 = case Probe of
                       none -> Lat;
                       {J, T0} -> check(fun tiny_ok/2, J, unwrap_term(frame(Port))),
                                  [erlang:monotonic_time(nanosecond) - T0 | Lat]
                   end,
            Lat1;
        {reply, R} when Probe =/= none ->
            {J, T0} = Probe,
            check(fun tiny_ok/2, J, R),
            Lat1 = [erlang:monotonic_time(nanosecond) - T0 | Lat],
            stream_loop(Port, Sid, Size, Half, Every, Got, Owed, none, I, Lat1);
        Other ->
            fail("unexpected frame during a stream: ~P", [Other, 12])
    end.

frame(Port) ->
    receive
        {Port, {data, Data}} -> binary_to_term(Data);
        {Port, {exit_status, S}} -> fail("server exited with status ~b", [S])
    after 120000 ->
        fail("no frame within 120 s", [])
    end.

unwrap_term({reply, R}) -> R;
unwrap_term(Other) -> fail("unexpected reply ~P", [Other, 12]).

%% ------------------------------------------------------------------ helpers

reply(Port) ->
    receive
        {Port, {data, Data}} -> unwrap(Data);
        {Port, {exit_status, S}} -> fail("server exited with status ~b", [S])
    after 120000 ->
        fail("no reply within 120 s", [])
    end.

unwrap(Data) ->
    case binary_to_term(Data) of
        {reply, R} -> R;
        Other -> fail("unexpected reply ~P", [Other, 12])
    end.

check(Check, I, R) ->
    case Check(I, R) of
        true -> ok;
        false -> fail("wrong reply to call ~b: ~P", [I, R, 12])
    end.

stats([]) -> {"-", "-", "-"};
stats(Lat) ->
    S = lists:sort(Lat),
    N = length(S),
    Pick = fun(Q) -> lists:nth(max(1, min(N, round(Q * N))), S) / 1000 end,
    Mean = lists:sum(S) / N / 1000,
    {fmt(Pick(0.50)), fmt(Pick(0.99)), fmt(Mean)}.

fmt(X) -> float_to_list(X, [{decimals, 1}]).

int(S) -> list_to_integer(S).

fail(Fmt, Args) ->
    io:format("error " ++ Fmt ++ "~n", Args),
    halt(1).
