%% @doc The pool process: owns the port to `python -m poolport serve'.
%%
%% ```
%%  callers ──call/cast──▶ poolport_server ──frames──▶ port ──▶ Python
%%     ▲                     │  FIFO of entries              │
%%     └──gen_server:reply───┘◀──────── replies in order ────┘
%% '''
%%
%% Callers encode their request themselves ({@link encode_call/3}); the
%% server writes it to the port at once and appends an entry to a FIFO
%% queue. Python answers every call and cast frame exactly once, in request
%% order, so each reply frame belongs to the entry at the head of the
%% queue. Entries:
%% <ul>
%% <li>`{call, MRef}': a caller, monitored with `MRef'; `pending' maps
%%   `MRef' to the caller's `From' and its timeout timer. When the caller
%%   times out or dies it is removed from `pending' but its entry stays in
%%   the queue, so the late reply is recognised and dropped.</li>
%% <li>`cast': the reply is `{noreply}' (or an error, which is logged).</li>
%% <li>`sys_info': the pool's own `'$poolport':info()' call, sent after
%%   each (re)opening of the port.</li>
%% </ul>
%%
%% When the Python process exits, all waiting callers get
%% `{error, port_closed}' and the port is reopened after a backoff (100 ms
%% doubling up to 5 s). More than `max_restarts' exits within
%% `restart_period' seconds stop the server with reason
%% `{restart_intensity, Details}'.
%%
%% Use the {@link poolport} module; this one is its implementation.
-module(poolport_server).
-behaviour(gen_server).

%% API.
-export([start_link/1]).
-export([call/3]).
-export([cast/2]).
-export([info/1]).
-export([prepare/1]).
-export([check_opts/1]).
-export([shutdown_timeout/1]).
-export([encode_call/3]).
-export([encode_cast/3]).

%% gen_server.
-export([init/1]).
-export([handle_call/3]).
-export([handle_cast/2]).
-export([handle_info/2]).
-export([terminate/2]).
-export([code_change/3]).

-include_lib("kernel/include/logger.hrl").

%% Extra time a caller waits beyond its timeout for the server's own
%% `{error, timeout}' before it gives up itself (only if the server is stuck).
-define(CALLER_MARGIN, 1000).
%% How long info/1 waits for the pool (gen_server:call/2's default).
-define(INFO_TIMEOUT, 5000).
%% First reopen delay after the Python process died, doubled on each
%% further death within the restart period.
-define(BACKOFF_MIN, 100).
%% Ceiling of the reopen delay.
-define(BACKOFF_MAX, 5000).
%% ms to wait after SIGTERM (then after SIGKILL) for the Python process.
-define(TERM_WAIT, 2000).
-define(KILL_WAIT, 1000).
%% Poll interval while waiting for the Python process to exit.
-define(EXIT_POLL, 10).

-type cfg() :: #{
    config := string() | undefined,
    python := string(),
    name := atom() | undefined,
    packet := 1 | 2 | 4,
    args := [string()],
    env := [{string(), string() | false}],
    cd := string() | undefined,
    max_restarts := non_neg_integer(),
    restart_period := pos_integer(),
    start_timeout := pos_integer(),
    stop_timeout := non_neg_integer()
}.
%% Validated, normalised options (see {@link poolport:opts()}).

-type entry() :: {call, reference()} | cast | sys_info.
-type waiter() :: {gen_server:from(), reference() | undefined}.
-type reply() :: {reply, term()} | noreply | {error, term()} | {bad_reply, term()}.

-export_type([cfg/0]).

-record(state, {
    cfg :: cfg(),
    port :: port() | undefined,
    os_pid :: non_neg_integer() | undefined,
    %% Requests written to the port and not answered yet, oldest first.
    queue = queue:new() :: queue:queue(entry()),
    %% Callers still waiting: monitor ref => {From, timeout timer}.
    pending = #{} :: #{reference() => waiter()},
    workers :: non_neg_integer() | undefined,
    server = #{} :: map(),
    %% Monotonic ms of Python exits within the restart period, newest first.
    deaths = [] :: [integer()],
    reopen_timer :: reference() | undefined,
    calls = 0 :: non_neg_integer(),
    casts = 0 :: non_neg_integer(),
    errors = 0 :: non_neg_integer(),
    timeouts = 0 :: non_neg_integer(),
    dropped = 0 :: non_neg_integer(),
    restarts = 0 :: non_neg_integer()
}).

-type state() :: #state{}.

%% API.

%% @doc Start a pool from options already checked by {@link prepare/1}.
-spec start_link(cfg()) -> {ok, pid()} | {error, term()}.
start_link(#{name := undefined} = Cfg) ->
    gen_server:start_link(?MODULE, Cfg, []);
start_link(#{name := Name} = Cfg) ->
    gen_server:start_link({local, Name}, ?MODULE, Cfg, []).

%% @doc Send an encoded call to a pool and wait for its result.
%%
%% The server enforces `Timeout'; the caller itself waits
%% `Timeout + 1000' ms so that a stuck server cannot block it forever.
%% `gen_server:call/3' with a timeout uses a process alias (OTP 24+), so a
%% reply arriving after the caller gave up is discarded by the runtime.
%%
%% A pool that does not exist (a dead pid, a name nobody registered) gives
%% `{error, noproc}', a pool on a node that cannot be reached
%% `{error, {nodedown, Node}}'; any other exit of `gen_server:call/3' (the
%% pool crashing while the call is pending) still exits the caller.
-spec call(poolport:pool(), binary(), timeout()) -> {ok, term()} | {error, poolport:reason()}.
call(Pool, Request, infinity) ->
    server_call(Pool, {call, Request, infinity}, infinity);
call(Pool, Request, Timeout) ->
    server_call(Pool, {call, Request, Timeout}, Timeout + ?CALLER_MARGIN).

%% `gen_server:call/3' that returns `{error, Reason}' instead of exiting
%% when the pool is not there or the call timed out (thanks to the process
%% alias, no late reply follows). Other exits are not caught.
-spec server_call(poolport:pool(), term(), timeout()) ->
          term() | {error, timeout | noproc | {nodedown, node()}}.
server_call(Pool, Message, Timeout) ->
    try
        gen_server:call(Pool, Message, Timeout)
    catch
        exit:{timeout, {gen_server, call, _}} -> {error, timeout};
        exit:{noproc, {gen_server, call, _}} -> {error, noproc};
        exit:{{nodedown, Node}, {gen_server, call, _}} -> {error, {nodedown, Node}}
    end.

%% @doc Send an encoded cast to a pool.
%%
%% `gen_server:cast/2' never fails: a cast to a pool that does not exist or
%% sits on an unreachable node is silently lost.
-spec cast(poolport:pool(), binary()) -> ok.
cast(Pool, Request) ->
    gen_server:cast(Pool, {cast, Request}).

%% @doc The pool's counters; `{error, noproc | {nodedown, Node} | timeout}'
%% if there is no pool or it did not answer within 5 s.
-spec info(poolport:pool()) -> map() | {error, noproc | {nodedown, node()} | timeout}.
info(Pool) ->
    server_call(Pool, info, ?INFO_TIMEOUT).

%% @doc Check options and resolve the interpreter and the config path.
%%
%% Impure: looks up `python' in `PATH' and checks that the config file
%% exists.
-spec prepare(poolport:opts() | [{atom(), term()}]) -> {ok, cfg()} | {error, term()}.
prepare(Opts) ->
    case check_opts(Opts) of
        {ok, Cfg} -> resolve(Cfg);
        {error, _} = Error -> Error
    end.

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
        python => application:get_env(poolport, python, "python3"),
        name => undefined,
        packet => 4,
        args => [],
        env => [],
        cd => undefined,
        max_restarts => 5,
        restart_period => 10,
        start_timeout => 15000,
        stop_timeout => 10000
    },
    case [K || K <- maps:keys(Opts), not maps:is_key(K, Defaults)] of
        [Key | _] ->
            {error, {unknown_option, Key}};
        [] ->
            check_each(maps:to_list(maps:merge(Defaults, Opts)), #{})
    end;
check_opts(Opts) ->
    {error, {bad_options, Opts}}.

%% @doc The `shutdown' a supervisor should allow a pool with these options.
-spec shutdown_timeout(cfg()) -> pos_integer().
shutdown_timeout(#{stop_timeout := StopTimeout}) ->
    StopTimeout + ?TERM_WAIT + ?KILL_WAIT + 1000.

%% @doc Encode `{call, Module, Function, Args}'.
-spec encode_call(atom(), atom(), list()) -> binary().
encode_call(Module, Function, Args) ->
    term_to_binary({call, Module, Function, Args}).

%% @doc Encode `{cast, Module, Function, Args}'.
-spec encode_cast(atom(), atom(), list()) -> binary().
encode_cast(Module, Function, Args) ->
    term_to_binary({cast, Module, Function, Args}).

%% gen_server.

%% @private
-spec init(cfg()) -> {ok, state()} | {stop, term()}.
init(Cfg) ->
    process_flag(trap_exit, true),
    State0 = #state{cfg = Cfg},
    case open(Cfg) of
        {ok, Port, OsPid} ->
            State = send_sys_info(State0#state{port = Port, os_pid = OsPid}),
            await_ready(State);
        {error, Reason} ->
            {stop, {open_port_failed, Reason}}
    end.

%% @private
-spec handle_call(term(), gen_server:from(), state()) ->
    {reply, term(), state()} | {noreply, state()}.
handle_call({call, _Request, _Timeout}, _From, #state{port = undefined} = State) ->
    {reply, {error, port_closed}, count_error(State#state{calls = State#state.calls + 1})};
handle_call({call, Request, Timeout}, {Pid, _} = From, State0) ->
    State = State0#state{calls = State0#state.calls + 1},
    #state{cfg = #{packet := Packet}, port = Port} = State,
    Frames = case Timeout of
                 infinity -> [Request];
                 _ -> [encode_timeout(Timeout), Request]
             end,
    case check_frame(Request, Packet) of
        {error, _} = Error ->
            {reply, Error, count_error(State)};
        ok ->
            case write(Port, Frames) of
                ok ->
                    MRef = erlang:monitor(process, Pid),
                    TRef = case Timeout of
                               infinity -> undefined;
                               _ -> erlang:send_after(Timeout, self(), {call_timeout, MRef})
                           end,
                    {noreply, State#state{
                        queue = queue:in({call, MRef}, State#state.queue),
                        pending = maps:put(MRef, {From, TRef}, State#state.pending)}};
                error ->
                    %% The port is dying; its exit message follows.
                    {reply, {error, port_closed}, count_error(State)}
            end
    end;
handle_call(info, _From, State) ->
    {reply, info_map(State), State};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

%% @private
-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast({cast, Request}, State0) ->
    State = State0#state{casts = State0#state.casts + 1},
    #state{cfg = #{packet := Packet}, port = Port} = State,
    Result = case Port of
                 undefined -> {error, port_closed};
                 _ ->
                     case check_frame(Request, Packet) of
                         ok -> write(Port, [Request]);
                         Error -> Error
                     end
             end,
    case Result of
        ok ->
            {noreply, State#state{queue = queue:in(cast, State#state.queue)}};
        Failed ->
            ?LOG_WARNING("poolport ~p: cast not sent: ~p", [pool_id(State), Failed]),
            {noreply, count_error(State)}
    end;
handle_cast(_Request, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), state()) -> {noreply, state()} | {stop, term(), state()}.
handle_info({Port, {data, Data}}, #state{port = Port} = State) ->
    {noreply, handle_reply(decode_reply(Data), State)};
handle_info({Port, {exit_status, Status}}, #state{port = Port} = State) ->
    port_down({exit_status, Status}, State);
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    port_down({port_exit, Reason}, State);
handle_info({call_timeout, MRef}, State) ->
    case maps:take(MRef, State#state.pending) of
        {{From, _TRef}, Pending} ->
            erlang:demonitor(MRef, [flush]),
            gen_server:reply(From, {error, timeout}),
            {noreply, count_error(State#state{pending = Pending,
                                              timeouts = State#state.timeouts + 1})};
        error ->
            {noreply, State}
    end;
handle_info({'DOWN', MRef, process, _Pid, _Reason}, State) ->
    case maps:take(MRef, State#state.pending) of
        {{_From, TRef}, Pending} ->
            cancel_timer(TRef),
            {noreply, State#state{pending = Pending}};
        error ->
            {noreply, State}
    end;
handle_info(reopen, #state{port = undefined} = State) ->
    reopen(State#state{reopen_timer = undefined});
handle_info(_Info, State) ->
    %% Stale messages of a previous port, the previous port's 'EXIT', ...
    {noreply, State}.

%% @private
-spec terminate(term(), state()) -> ok.
terminate(_Reason, State) ->
    cancel_timer(State#state.reopen_timer),
    _ = fail_pending(State),
    case State#state.port of
        undefined -> ok;
        Port -> close(Port, State#state.os_pid, maps:get(stop_timeout, State#state.cfg))
    end.

%% @private
-spec code_change(term(), state(), term()) -> {ok, state()}.
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

%% Internal.

%% Options.

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
            case Config of
                undefined ->
                    {ok, Cfg#{python := Exe}};
                _ ->
                    Abs = filename:absname(Config),
                    case filelib:is_regular(Abs) of
                        true -> {ok, Cfg#{python := Exe, config := Abs}};
                        false -> {error, {config_not_found, Abs}}
                    end
            end
    end.

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

%% The port.

%% Command line arguments after the interpreter.
-spec port_args(cfg()) -> [string()].
port_args(#{config := Config, packet := Packet, args := Args}) ->
    ConfigArgs = case Config of
                     undefined -> [];
                     _ -> ["--config", Config]
                 end,
    ["-m", "poolport", "serve"] ++ ConfigArgs ++ ["--packet", integer_to_list(Packet)] ++ Args.

%% open_port/2 settings. stderr is not redirected: Python logs go to the
%% node's stderr, stdout carries frames only.
-spec port_settings(cfg()) -> list().
port_settings(#{packet := Packet, env := Env, cd := Cd} = Cfg) ->
    [{args, port_args(Cfg)}, {packet, Packet}, binary, exit_status, use_stdio, hide]
        ++ [{env, Env} || Env =/= []]
        ++ [{cd, Cd} || Cd =/= undefined].

-spec open(cfg()) -> {ok, port(), non_neg_integer() | undefined} | {error, term()}.
open(#{python := Python} = Cfg) ->
    try open_port({spawn_executable, Python}, port_settings(Cfg)) of
        Port ->
            OsPid = case erlang:port_info(Port, os_pid) of
                        {os_pid, Pid} -> Pid;
                        undefined -> undefined
                    end,
            {ok, Port, OsPid}
    catch
        error:Reason -> {error, Reason}
    end.

%% Wait for the answer to the first sys_info request, so that start_link
%% returning {ok, Pid} means Python is up and answering.
-spec await_ready(state()) -> {ok, state()} | {stop, term()}.
await_ready(#state{port = Port, os_pid = OsPid, cfg = #{start_timeout := Timeout}} = State) ->
    receive
        {Port, {data, Data}} ->
            {ok, handle_reply(decode_reply(Data), State)};
        {Port, {exit_status, Status}} ->
            {stop, {python_exited, Status}};
        {'EXIT', Port, Reason} ->
            {stop, {port_exit, Reason}}
    after Timeout ->
        close(Port, OsPid, 0),
        {stop, {start_timeout, Timeout}}
    end.

-spec write(port(), [binary()]) -> ok | error.
write(Port, Frames) ->
    try
        lists:foreach(fun(Frame) -> true = erlang:port_command(Port, Frame) end, Frames)
    catch
        error:badarg -> error
    end.

-spec check_frame(binary(), 1 | 2 | 4) -> ok | {error, poolport:bert_error()}.
check_frame(Frame, Packet) ->
    Size = byte_size(Frame),
    Max = (1 bsl (8 * Packet)) - 1,
    case Size =< Max of
        true ->
            ok;
        false ->
            Detail = iolist_to_binary(io_lib:format(
                "request of ~b bytes does not fit {packet, ~b} (at most ~b bytes)",
                [Size, Packet, Max])),
            {error, {protocol, 0, <<"FrameTooLarge">>, Detail, []}}
    end.

-spec send_sys_info(state()) -> state().
send_sys_info(#state{port = Port} = State) ->
    case write(Port, [encode_call('$poolport', info, [])]) of
        ok -> State#state{queue = queue:in(sys_info, State#state.queue)};
        error -> State
    end.

-spec reopen(state()) -> {noreply, state()} | {stop, term(), state()}.
reopen(#state{cfg = Cfg} = State0) ->
    State = State0#state{restarts = State0#state.restarts + 1},
    case open(Cfg) of
        {ok, Port, OsPid} ->
            ?LOG_NOTICE("poolport ~p: Python restarted (os pid ~p, restart ~b)",
                        [pool_id(State), OsPid, State#state.restarts]),
            {noreply, send_sys_info(State#state{port = Port, os_pid = OsPid})};
        {error, Reason} ->
            port_down({open_port_failed, Reason}, State)
    end.

%% The Python process is gone: fail the waiting callers, then reopen the
%% port after a backoff, or stop if it died too often.
-spec port_down(term(), state()) -> {noreply, state()} | {stop, term(), state()}.
port_down(Why, #state{cfg = Cfg} = State0) ->
    #{max_restarts := MaxRestarts, restart_period := Period} = Cfg,
    State1 = fail_pending(State0),
    Now = erlang:monotonic_time(millisecond),
    Deaths = recent([Now | State1#state.deaths], Now, Period * 1000),
    State = State1#state{port = undefined, os_pid = undefined, queue = queue:new(),
                         deaths = Deaths},
    case length(Deaths) > MaxRestarts of
        true ->
            ?LOG_ERROR("poolport ~p: Python exited (~p), more than ~b times in ~b s; giving up",
                       [pool_id(State), Why, MaxRestarts, Period]),
            {stop, {restart_intensity, #{last_exit => Why, max_restarts => MaxRestarts,
                                         restart_period => Period}}, State};
        false ->
            Delay = backoff(length(Deaths)),
            ?LOG_ERROR("poolport ~p: Python exited (~p) with ~b request(s) pending; "
                       "reopening in ~b ms",
                       [pool_id(State0), Why, queue:len(State0#state.queue), Delay]),
            TRef = erlang:send_after(Delay, self(), reopen),
            {noreply, State#state{reopen_timer = TRef}}
    end.

%% Timestamps (ms) within the last Period ms.
-spec recent([integer()], integer(), pos_integer()) -> [integer()].
recent(Deaths, Now, Period) ->
    [T || T <- Deaths, Now - T < Period].

%% Reopen delay after the Nth death within the restart period.
-spec backoff(pos_integer()) -> pos_integer().
backoff(N) ->
    min(?BACKOFF_MAX, ?BACKOFF_MIN bsl min(N - 1, 16)).

%% Close the port, then wait until the OS process exited, escalating to
%% SIGTERM and SIGKILL.
-spec close(port(), non_neg_integer() | undefined, non_neg_integer()) -> ok.
close(Port, OsPid, Timeout) ->
    try
        erlang:port_close(Port)
    catch
        error:badarg -> true
    end,
    case OsPid of
        undefined ->
            ok;
        _ ->
            _ = wait_exit(OsPid, Timeout) orelse
                begin
                    ?LOG_WARNING("poolport: Python os pid ~b still running ~b ms after "
                                 "stdin closed; sending SIGTERM", [OsPid, Timeout]),
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

%% Replies.

%% `{info, timeout, [{ms, Ms}]}'; Python reads 0 as "no limit", so a zero
%% timeout is sent as 1 ms.
-spec encode_timeout(non_neg_integer()) -> binary().
encode_timeout(Ms) ->
    term_to_binary({info, timeout, [{ms, max(Ms, 1)}]}).

-spec decode_reply(binary()) -> reply().
decode_reply(Data) ->
    try binary_to_term(Data) of
        {reply, Result} -> {reply, Result};
        {noreply} -> noreply;
        {error, Error} -> {error, Error};
        Other -> {bad_reply, Other}
    catch
        error:badarg -> {bad_reply, Data}
    end.

%% What a caller gets for a reply.
-spec call_result(reply()) -> {ok, term()} | {error, term()}.
call_result({reply, Result}) ->
    {ok, Result};
call_result({error, {server, 3, _Class, _Detail, _Trace}}) ->
    %% Python stopped the call at its timeout before we noticed ours.
    {error, timeout};
call_result({error, Error}) ->
    {error, Error};
call_result(noreply) ->
    {error, {protocol, 0, <<"UnexpectedReply">>, <<"{noreply} for a call">>, []}};
call_result({bad_reply, Term}) ->
    Detail = iolist_to_binary(io_lib:format("~0P", [Term, 20])),
    {error, {protocol, 0, <<"UnexpectedReply">>, Detail, []}}.

-spec handle_reply(reply(), state()) -> state().
handle_reply(Reply, State) ->
    case queue:out(State#state.queue) of
        {{value, Entry}, Queue} ->
            deliver(Entry, Reply, State#state{queue = Queue});
        {empty, _} ->
            ?LOG_WARNING("poolport ~p: reply with no request pending: ~0P",
                         [pool_id(State), Reply, 20]),
            State
    end.

-spec deliver(entry(), reply(), state()) -> state().
deliver({call, MRef}, Reply, State) ->
    case maps:take(MRef, State#state.pending) of
        {{From, TRef}, Pending} ->
            cancel_timer(TRef),
            erlang:demonitor(MRef, [flush]),
            Result = call_result(Reply),
            gen_server:reply(From, Result),
            State1 = State#state{pending = Pending},
            case Result of
                {ok, _} -> State1;
                {error, timeout} -> count_error(State1#state{timeouts = State1#state.timeouts + 1});
                {error, _} -> count_error(State1)
            end;
        error ->
            %% The caller timed out or died: drop the late reply.
            State#state{dropped = State#state.dropped + 1}
    end;
deliver(cast, noreply, State) ->
    State;
deliver(cast, Reply, State) ->
    ?LOG_WARNING("poolport ~p: cast failed: ~0P", [pool_id(State), Reply, 30]),
    count_error(State);
deliver(sys_info, {reply, #{} = Info}, State) ->
    Workers = case maps:get(workers, Info, undefined) of
                  N when is_integer(N), N >= 0 -> N;
                  _ -> undefined
              end,
    State#state{workers = Workers, server = Info};
deliver(sys_info, Reply, State) ->
    ?LOG_INFO("poolport ~p: '$poolport':info() answered ~0P", [pool_id(State), Reply, 30]),
    State.

%% Reply {error, port_closed} to every waiting caller.
-spec fail_pending(state()) -> state().
fail_pending(#state{pending = Pending} = State) ->
    maps:foreach(
        fun(MRef, {From, TRef}) ->
            cancel_timer(TRef),
            erlang:demonitor(MRef, [flush]),
            gen_server:reply(From, {error, port_closed})
        end, Pending),
    State#state{pending = #{}, errors = State#state.errors + map_size(Pending)}.

-spec count_error(state()) -> state().
count_error(State) ->
    State#state{errors = State#state.errors + 1}.

-spec cancel_timer(reference() | undefined) -> ok.
cancel_timer(undefined) ->
    ok;
cancel_timer(TRef) ->
    _ = erlang:cancel_timer(TRef, [{async, true}, {info, false}]),
    ok.

-spec info_map(state()) -> map().
info_map(#state{cfg = Cfg} = State) ->
    #{workers => State#state.workers,
      in_flight => queue:len(State#state.queue),
      waiting => map_size(State#state.pending),
      calls => State#state.calls,
      casts => State#state.casts,
      errors => State#state.errors,
      timeouts => State#state.timeouts,
      dropped => State#state.dropped,
      restarts => State#state.restarts,
      os_pid => State#state.os_pid,
      status => case State#state.port of undefined -> restarting; _ -> running end,
      packet => maps:get(packet, Cfg),
      python => maps:get(python, Cfg),
      config => maps:get(config, Cfg),
      server => State#state.server}.

-spec pool_id(state()) -> atom() | pid().
pool_id(#state{cfg = #{name := undefined}}) -> self();
pool_id(#state{cfg = #{name := Name}}) -> Name.

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
                   prepare(#{python => "sh", config => undefined}))].

port_args_test_() ->
    [?_assertEqual(["-m", "poolport", "serve", "--config", "/c.yaml", "--packet", "4"],
                   port_args(cfg(#{config => "/c.yaml"}))),
     ?_assertEqual(["-m", "poolport", "serve", "--packet", "2", "--log-level", "debug"],
                   port_args(cfg(#{config => undefined, packet => 2,
                                   args => ["--log-level", "debug"]})))].

port_settings_test() ->
    Settings = port_settings(cfg(#{packet => 2, env => [{"X", "1"}], cd => "/tmp"})),
    ?assert(lists:member({packet, 2}, Settings)),
    ?assert(lists:member(binary, Settings)),
    ?assert(lists:member(exit_status, Settings)),
    ?assert(lists:member({env, [{"X", "1"}]}, Settings)),
    ?assert(lists:member({cd, "/tmp"}, Settings)),
    ?assertNot(lists:member(stderr_to_stdout, Settings)),
    ?assertNot(lists:keymember(cd, 1, port_settings(cfg(#{})))).

encode_test_() ->
    [?_assertEqual({call, m, f, [1, <<"a">>]}, binary_to_term(encode_call(m, f, [1, <<"a">>]))),
     ?_assertEqual({cast, m, f, []}, binary_to_term(encode_cast(m, f, []))),
     ?_assertEqual({info, timeout, [{ms, 250}]}, binary_to_term(encode_timeout(250))),
     ?_assertEqual({info, timeout, [{ms, 1}]}, binary_to_term(encode_timeout(0)))].

decode_reply_test_() ->
    E = {user, 0, <<"ValueError">>, <<"bad">>, [<<"tb">>]},
    [?_assertEqual({reply, 42}, decode_reply(term_to_binary({reply, 42}))),
     ?_assertEqual(noreply, decode_reply(term_to_binary({noreply}))),
     ?_assertEqual({error, E}, decode_reply(term_to_binary({error, E}))),
     ?_assertEqual({bad_reply, {what}}, decode_reply(term_to_binary({what}))),
     ?_assertEqual({bad_reply, <<1, 2, 3>>}, decode_reply(<<1, 2, 3>>))].

call_result_test_() ->
    E = {user, 0, <<"ValueError">>, <<"bad">>, []},
    [?_assertEqual({ok, x}, call_result({reply, x})),
     ?_assertEqual({error, E}, call_result({error, E})),
     ?_assertEqual({error, timeout},
                   call_result({error, {server, 3, <<"Timeout">>, <<>>, []}})),
     ?_assertMatch({error, {protocol, 0, <<"UnexpectedReply">>, _, []}}, call_result(noreply)),
     ?_assertMatch({error, {protocol, 0, <<"UnexpectedReply">>, _, []}},
                   call_result({bad_reply, {what}}))].

check_frame_test_() ->
    [?_assertEqual(ok, check_frame(<<0:255/unit:8>>, 1)),
     ?_assertMatch({error, {protocol, 0, <<"FrameTooLarge">>, _, []}},
                   check_frame(<<0:256/unit:8>>, 1)),
     ?_assertEqual(ok, check_frame(<<0:65535/unit:8>>, 2)),
     ?_assertMatch({error, _}, check_frame(<<0:65536/unit:8>>, 2)),
     ?_assertEqual(ok, check_frame(<<0:65536/unit:8>>, 4))].

backoff_test_() ->
    [?_assertEqual(100, backoff(1)),
     ?_assertEqual(200, backoff(2)),
     ?_assertEqual(3200, backoff(6)),
     ?_assertEqual(5000, backoff(7)),
     ?_assertEqual(5000, backoff(1000))].

recent_test() ->
    ?assertEqual([1000, 900], recent([1000, 900, 100, 0], 1000, 500)).

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

%% FIFO matching with a fake state: replies go to the head entry, late
%% replies of timed-out callers are dropped, casts and sys_info consume
%% their own reply.
fifo_test() ->
    Self = self(),
    Tag2 = make_ref(),
    M1 = erlang:monitor(process, Self),
    M2 = erlang:monitor(process, Self),
    State0 = #state{cfg = cfg(#{}),
                    queue = queue:from_list([sys_info, {call, M1}, cast, {call, M2}]),
                    pending = #{M2 => {{Self, Tag2}, undefined}}},
    S1 = handle_reply({reply, #{workers => 3}}, State0),
    ?assertEqual(3, S1#state.workers),
    S2 = handle_reply({reply, late}, S1),
    ?assertEqual(1, S2#state.dropped),
    S3 = handle_reply(noreply, S2),
    ?assertEqual(0, S3#state.errors),
    S4 = handle_reply({error, {user, 0, <<"E">>, <<>>, []}}, S3),
    ?assertEqual(1, S4#state.errors),
    ?assertEqual(#{}, S4#state.pending),
    ?assert(queue:is_empty(S4#state.queue)),
    receive {Tag2, Reply} -> ?assertEqual({error, {user, 0, <<"E">>, <<>>, []}}, Reply)
    after 0 -> ?assert(false)
    end,
    erlang:demonitor(M1, [flush]),
    S5 = handle_reply({reply, stray}, S4),
    ?assertEqual(S4, S5).

fail_pending_test() ->
    Tag = make_ref(),
    MRef = erlang:monitor(process, self()),
    S = fail_pending(#state{cfg = cfg(#{}), pending = #{MRef => {{self(), Tag}, undefined}}}),
    ?assertEqual(#{}, S#state.pending),
    ?assertEqual(1, S#state.errors),
    receive {Tag, R} -> ?assertEqual({error, port_closed}, R) after 0 -> ?assert(false) end.

-endif.
