#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noshell
%% Drives `poolport serve` from a real Erlang VM through a real port, the way
%% an Erlang application would: Calls requests written at once (pipelined),
%% replies matched in order. Used by `poolport demo` and the end-to-end tests.
%%
%% escript driver.escript Mode Python Calls Arg -- ServeArg...
%%   Mode burn: {call, poolport.demo_handlers, burn, [Arg]}      (CPU-heavy)
%%   Mode echo: {call, poolport.demo_handlers, echo, [{I, <<...>>}]} (unique payloads)
%% Prints one line: "ok Calls Microseconds DistinctWorkerPids" or "error ...".
-mode(compile).

main([Mode, Python, CallsS, ArgS, "--" | ServeArgs]) ->
    Calls = list_to_integer(CallsS),
    Arg = list_to_integer(ArgS),
    Port = open_port({spawn_executable, Python},
                     [{args, ["-m", "poolport", "serve" | ServeArgs]},
                      {packet, 4}, binary, exit_status]),
    Pids = warm_up(Port, 0),
    T0 = erlang:monotonic_time(microsecond),
    Requests = [request(Mode, I, Arg) || I <- lists:seq(1, Calls)],
    [port_command(Port, term_to_binary(R)) || R <- Requests],
    case collect(Port, Mode, 1, Calls, Arg) of
        ok ->
            T1 = erlang:monotonic_time(microsecond),
            io:format("ok ~b ~b ~b~n", [Calls, T1 - T0, length(Pids)]),
            port_close(Port),
            halt(0);
        {error, Why} ->
            io:format("error ~p~n", [Why]),
            halt(1)
    end;
main(_) ->
    io:format("usage: driver.escript burn|echo Python Calls Arg -- ServeArg...~n"),
    halt(2).

request("burn", _I, Steps) -> {call, 'poolport.demo_handlers', burn, [Steps]};
request("echo", I, _) -> {call, 'poolport.demo_handlers', echo, [{I, integer_to_binary(I * 7919)}]}.

%% Wait until every worker has answered once, so the timing excludes start-up.
warm_up(Port, Tries) when Tries < 200 ->
    port_command(Port, term_to_binary({call, '$poolport', info, []})),
    #{workers := Workers} = receive_reply(Port),
    N = 4 * Workers,
    [port_command(Port, term_to_binary({call, 'poolport.demo_handlers', whoami, [20]}))
     || _ <- lists:seq(1, N)],
    Pids = lists:usort([receive_reply(Port) || _ <- lists:seq(1, N)]),
    case length(Pids) >= Workers of
        true -> Pids;
        false -> warm_up(Port, Tries + 1)
    end.

receive_reply(Port) ->
    receive
        {Port, {data, Data}} ->
            {reply, R} = binary_to_term(Data),
            R;
        {Port, {exit_status, S}} ->
            io:format("error poolport exited with status ~b~n", [S]),
            halt(1)
    after 60000 ->
        io:format("error no reply within 60 s~n"),
        halt(1)
    end.

collect(_Port, _Mode, I, Calls, _Arg) when I > Calls -> ok;
collect(Port, Mode, I, Calls, Arg) ->
    Expected = expected(Mode, I, Arg),
    case receive_reply(Port) of
        R when Expected =:= any; R =:= Expected -> collect(Port, Mode, I + 1, Calls, Arg);
        Other -> {error, {reply, I, Other, expected, Expected}}
    end.

expected("burn", _I, _Steps) -> any;
expected("echo", I, _) -> {I, integer_to_binary(I * 7919)}.
