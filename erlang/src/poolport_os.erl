%% @doc The Python OS process of a pool: opening its port, diagnosing a
%% failed start, and making sure it is gone when the port closes (stdin
%% closed, then SIGTERM, then SIGKILL to it and its children), without
%% ever leaving a zombie or a stray worker behind.
-module(poolport_os).

-export([open/1]).
-export([diagnose/1]).
-export([close/3]).
-export([discard/2]).
-export([wait_exit/2]).
-export([shutdown_timeout/1]).

-include_lib("kernel/include/logger.hrl").

%% ms to wait after SIGTERM (then after SIGKILL) for the Python process.
-define(TERM_WAIT, 2000).
-define(KILL_WAIT, 1000).
%% Poll interval while waiting for the Python process to exit.
-define(EXIT_POLL, 10).
%% A failed start is diagnosed by `poolport check --init': at most this long,
%% keeping the last ?TAIL_LINES lines (at most ?TAIL_BYTES bytes) of its output.
-define(DIAGNOSE_TIMEOUT, 30000).
-define(TAIL_LINES, 20).
-define(TAIL_BYTES, 4000).

%% @doc The `shutdown' a supervisor should allow a pool with these options.
-spec shutdown_timeout(poolport_opts:cfg()) -> pos_integer().
shutdown_timeout(#{stop_timeout := StopTimeout}) ->
    StopTimeout + ?TERM_WAIT + ?KILL_WAIT + 1000.

-spec open(poolport_opts:cfg()) -> {ok, port(), non_neg_integer() | undefined} | {error, term()}.
open(#{python := Python} = Cfg) ->
    try open_port({spawn_executable, Python}, poolport_opts:port_settings(Cfg)) of
        Port ->
            OsPid = case erlang:port_info(Port, os_pid) of
                        {os_pid, Pid} -> Pid;
                        undefined -> undefined
                    end,
            {ok, Port, OsPid}
    catch
        error:Reason -> {error, Reason}
    end.

%% Why Python could not start, in its own words. Its stderr went to the
%% node's, not to us, so the same interpreter runs `poolport check --init'
%% with the same options and environment, whose output (stderr included) names
%% what failed: a config key, a module that does not import, the worker_init
%% traceback, or "No module named poolport". Only on a failed start.
-spec diagnose(poolport_opts:cfg()) -> binary().
diagnose(#{python := Python, env := Env, cd := Cd} = Cfg) ->
    Settings = [{args, poolport_opts:command_args("check", ["--init"], Cfg)}, stream, binary, exit_status,
                stderr_to_stdout, use_stdio, hide]
        ++ [{env, Env} || Env =/= []]
        ++ [{cd, Cd} || Cd =/= undefined],
    try open_port({spawn_executable, Python}, Settings) of
        Port ->
            Deadline = erlang:monotonic_time(millisecond) + ?DIAGNOSE_TIMEOUT,
            tail(collect(Port, <<>>, Deadline))
    catch
        error:Reason -> iolist_to_binary(io_lib:format("cannot run ~ts: ~p", [Python, Reason]))
    end.

-spec collect(port(), binary(), integer()) -> binary().
collect(Port, Acc, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, Data}} ->
            Kept = <<Acc/binary, Data/binary>>,
            Cut = max(0, byte_size(Kept) - 16 * ?TAIL_BYTES),
            collect(Port, binary:part(Kept, Cut, byte_size(Kept) - Cut), Deadline);
        {Port, {exit_status, _}} ->
            receive {'EXIT', Port, _} -> ok after 1000 -> ok end,
            Acc
    after Left ->
        _ = case erlang:port_info(Port, os_pid) of
                {os_pid, OsPid} -> os:cmd("kill -KILL " ++ integer_to_list(OsPid) ++ " 2>/dev/null");
                undefined -> ok
            end,
        catch port_close(Port),
        receive {'EXIT', Port, _} -> ok after 1000 -> ok end,
        <<Acc/binary, "\n(poolport check did not finish in time)">>
    end.

%% The last ?TAIL_LINES non-empty lines of Output, at most ?TAIL_BYTES bytes,
%% never starting inside a UTF-8 character.
-spec tail(binary()) -> binary().
tail(Output) ->
    Lines = [L || L <- binary:split(Output, <<"\n">>, [global]), L =/= <<>>],
    Last = lists:nthtail(max(0, length(Lines) - ?TAIL_LINES), Lines),
    Joined = iolist_to_binary(lists:join(<<"\n">>, Last)),
    Cut = max(0, byte_size(Joined) - ?TAIL_BYTES),
    char_start(binary:part(Joined, Cut, byte_size(Joined) - Cut)).

-spec char_start(binary()) -> binary().
char_start(<<2#10:2, _:6, Rest/binary>>) -> char_start(Rest);
char_start(Bin) -> Bin.

%% Close the port, then wait until the OS process exited, escalating to
%% SIGTERM and SIGKILL.
-spec close(port(), non_neg_integer() | undefined, non_neg_integer()) -> ok.
close(Port, OsPid, Timeout) ->
    close_port(Port),
    reap(OsPid, Timeout).

%% Close the port at once (no more data arrives from it) and leave the
%% killing of the OS process, with no grace period, to a helper process:
%% the server goes on at once.
-spec discard(port(), non_neg_integer() | undefined) -> ok.
discard(Port, OsPid) ->
    close_port(Port),
    case OsPid of
        undefined -> ok;
        _ -> _ = proc_lib:spawn(fun() -> reap(OsPid, 0) end), ok
    end.

-spec close_port(port()) -> ok.
close_port(Port) ->
    try
        erlang:port_close(Port)
    catch
        error:badarg -> true
    end,
    ok.

%% Wait up to Timeout ms for the OS process to exit (its stdin is closed),
%% then send SIGTERM, then SIGKILL to it and its child processes.
-spec reap(non_neg_integer() | undefined, non_neg_integer()) -> ok.
reap(OsPid, Timeout) ->
    case OsPid of
        undefined ->
            ok;
        _ ->
            _ = wait_exit(OsPid, Timeout) orelse
                begin
                    case Timeout of
                        0 -> ok;  % a kill on purpose (misaligned), not a surprise
                        _ -> ?LOG_WARNING("poolport: Python os pid ~b still running ~b ms "
                                          "after stdin closed; sending SIGTERM",
                                          [OsPid, Timeout])
                    end,
                    _ = os:cmd("kill -TERM " ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
                    wait_exit(OsPid, ?TERM_WAIT)
                end orelse
                begin
                    %% Python cannot clean up after SIGKILL: take its workers too.
                    Children = children(OsPid),
                    ?LOG_WARNING("poolport: Python os pid ~b ignored SIGTERM; sending SIGKILL "
                                 "to it and its child processes ~w", [OsPid, Children]),
                    _ = os:cmd(lists:flatten(["kill -KILL",
                                              [[$\s | integer_to_list(P)] || P <- [OsPid | Children]],
                                              " 2>/dev/null"])),
                    wait_exit(OsPid, ?KILL_WAIT)
                end,
            ok
    end.

%% Direct child processes of an OS process (empty if pgrep is missing).
-spec children(non_neg_integer()) -> [non_neg_integer()].
children(OsPid) ->
    Out = os:cmd("pgrep -P " ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
    [list_to_integer(P) || P <- string:lexemes(Out, " \n"),
                           lists:all(fun(C) -> C >= $0 andalso C =< $9 end, P)].

-spec wait_exit(non_neg_integer(), non_neg_integer()) -> boolean().
wait_exit(OsPid, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    wait_exit_until(OsPid, Deadline).

-spec wait_exit_until(non_neg_integer(), integer()) -> boolean().
wait_exit_until(OsPid, Deadline) ->
    case os_alive(OsPid) of
        false ->
            true;
        true ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true ->
                    false;
                false ->
                    receive after ?EXIT_POLL -> ok end,
                    wait_exit_until(OsPid, Deadline)
            end
    end.

%% Whether an OS process is still running (zombies count as gone).
-spec os_alive(non_neg_integer()) -> boolean().
os_alive(OsPid) ->
    Pid = integer_to_list(OsPid),
    case filelib:is_dir("/proc/self") of
        true ->
            case file:read_file("/proc/" ++ Pid ++ "/stat") of
                {ok, Stat} -> not zombie(Stat);
                {error, _} -> false
            end;
        false ->
            os:cmd("kill -0 " ++ Pid ++ " 2>/dev/null && echo alive") =:= "alive\n"
    end.

%% /proc/PID/stat is "pid (comm) S ...": the state follows the last ')'.
-spec zombie(binary()) -> boolean().
zombie(Stat) ->
    case binary:matches(Stat, <<")">>) of
        [] ->
            false;
        Matches ->
            {Pos, 1} = lists:last(Matches),
            case binary:part(Stat, Pos + 1, byte_size(Stat) - Pos - 1) of
                <<" Z", _/binary>> -> true;
                <<" X", _/binary>> -> true;
                _ -> false
            end
    end.

-ifdef(TEST).
-include_lib("eunit/include/eunit.hrl").

tail_test_() ->
    Many = iolist_to_binary([[integer_to_list(I), "\n"] || I <- lists:seq(1, 30)]),
    Long = binary:copy(<<"\x{e9}"/utf8>>, 3000),  % 6000 bytes of 2-byte characters
    [?_assertEqual(<<"a\nb">>, tail(<<"\n\na\n\nb\n">>)),
     ?_assertEqual(iolist_to_binary(lists:join("\n", [integer_to_list(I) || I <- lists:seq(11, 30)])),
                   tail(Many)),
     ?_assertEqual(binary:copy(<<"\x{e9}"/utf8>>, 2000), tail(<<0, Long/binary>>)),  % whole characters
     ?_assertEqual(<<>>, tail(<<>>))].

zombie_test_() ->
    [?_assert(zombie(<<"12 (python3) Z 1 2 3">>)),
     ?_assert(zombie(<<"12 (a) b) Z 1">>)),
     ?_assertNot(zombie(<<"12 (python3) S 1 2 3">>)),
     ?_assertNot(zombie(<<"garbage">>))].

os_alive_test() ->
    ?assert(os_alive(list_to_integer(os:getpid()))),
    Port = open_port({spawn_executable, "/bin/sh"}, [{args, ["-c", "exit 0"]}, exit_status]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    receive {Port, {exit_status, 0}} -> ok end,
    ?assert(wait_exit(OsPid, 5000)).

-endif.
