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
%% <b>Tagged replies.</b> FIFO order alone cannot tell when the reply stream
%% is out of step (a reply lost or sent twice): every later caller would
%% silently get another caller's answer. So Python is started with
%% `--reply-tags' and prefixes every reply with the number of the request it
%% answers, `<<Seq:64/big-unsigned, Etf/binary>>'. Requests are numbered
%% from 0 at every (re)opening of the port; every frame Python answers
%% (call, cast, `sys_info') counts, the `{info, timeout, ...}' frames sent
%% before calls do not. Each queue entry carries its number, and a reply is
%% delivered only if its number is the head entry's. Anything else (another
%% number, a frame shorter than 8 bytes, a reply with no request pending, an
%% `Etf' part that does not decode) is a misalignment: it is logged, counted
%% (`misaligned' in {@link info/1}), every waiting caller gets
%% `{error, misaligned}', the port is closed, the Python process is killed
%% (SIGTERM, then SIGKILL to it and its children, by a helper process so
%% the server does not block) and the port is reopened like after a death
%% of Python. No caller ever receives a reply that is not its own.
%%
%% When the Python process exits, all waiting callers get
%% `{error, port_closed}' and the port is reopened after a backoff (100 ms
%% doubling up to 5 s). More than `max_restarts' exits (misalignments
%% included) within `restart_period' seconds stop the server with reason
%% `{restart_intensity, Details}'.
%%
%% Use the {@link poolport} module; this one is its implementation.
-module(poolport_server).
-behaviour(gen_server).

%% API.
-export([start_link/1]).
-export([call/3]).
-export([stream/4]).
-export([next/3]).
-export([cancel/2]).
-export([member_call/3]).
-export([cast/2]).
-export([info/1]).
-export([prepare/1]).
-export([check_opts/1]).
-export([shutdown_timeout/1]).
-export([clamp_timeout/1]).
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
%% Largest call timeout (ms, about 49.7 days): the largest value every OTP
%% release accepts in `erlang:send_after/3' and in `receive ... after'
%% (which `gen_server:call/3' uses). Longer timeouts are clamped to it.
-define(MAX_TIMEOUT, 4294967295).
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
%% A failed start is diagnosed by `poolport check --init': at most this long,
%% keeping the last ?TAIL_LINES lines (at most ?TAIL_BYTES bytes) of its output.
-define(DIAGNOSE_TIMEOUT, 30000).
-define(TAIL_LINES, 20).
-define(TAIL_BYTES, 4000).

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
    callbacks := [module() | {module(), atom()}]
}.
%% Validated, normalised options (see {@link poolport:opts()}).

-type entry() :: {call, reference()} | {stream, reference(), pos_integer()} | cast | sys_info.
-type seq() :: 0..16#FFFFFFFFFFFFFFFF.
%% Number of a request on the current port, as in Python's reply tags.
-type misalignment() :: #{why := seq_mismatch | empty_queue | short_frame | bad_term | unknown_stream,
                          expected := seq() | none,
                          got := seq() | none}.
%% What was wrong with a reply frame: `expected' is the head entry's number
%% (`none' if no request was pending), `got' the frame's (`none' if it was
%% too short to carry one).
-type waiter() :: {gen_server:from(), reference() | undefined}.
-type reply() :: {reply, term()} | noreply | {error, term()} | {bad_reply, term()}.

-export_type([cfg/0]).

-record(state, {
    cfg :: cfg(),
    port :: port() | undefined,
    os_pid :: non_neg_integer() | undefined,
    %% Requests written to the port and not answered yet, oldest first,
    %% each with its number.
    queue = queue:new() :: queue:queue({seq(), entry()}),
    %% Number of the next request written to the current port.
    seq = 0 :: seq(),
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
    restarts = 0 :: non_neg_integer(),
    misaligned = 0 :: non_neg_integer(),
    %% In the pg group of the `group' option (see poolport_group).
    joined = false :: boolean(),
    %% Open streams by their consumer's monitor, and their numbers on the
    %% current port (a cancelled stream keeps its number, mapped to
    %% `cancelled', until Python's last frame for it).
    streams = #{} :: #{reference() => poolport_stream:stream()},
    stream_ids = #{} :: #{seq() => reference() | cancelled}
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
call(Pool, Request, Timeout) ->
    request(Pool, call, Request, Timeout).

%% @doc Start a stream: an encoded `{stream, M, F, Args, Opts}' request,
%% `Window' the items Python may send ahead, `Timeout' for its start (and,
%% in Python, for each item). `{ok, {poolport_stream, Pool, Ref}}'.
-spec stream(poolport:pool(), binary(), pos_integer(), timeout()) ->
          {ok, poolport:stream()} | {error, poolport:reason()}.
stream(Pool, Request, Window, Timeout0) ->
    Timeout = clamp_timeout(Timeout0),
    Wait = case Timeout of
               infinity -> infinity;
               _ -> min(Timeout + ?CALLER_MARGIN, ?MAX_TIMEOUT)
           end,
    server_call(Pool, {stream, Request, Window, Timeout}, Wait).

%% @doc The next item of a stream (see {@link poolport:next/2}).
-spec next(pid(), reference(), timeout()) -> poolport_stream:result().
next(Pool, Ref, Timeout0) ->
    Timeout = clamp_timeout(Timeout0),
    Wait = case Timeout of
               infinity -> infinity;
               _ -> min(Timeout + ?CALLER_MARGIN, ?MAX_TIMEOUT)
           end,
    server_call(Pool, {next, Ref, Timeout}, Wait).

%% @doc Close a stream (see {@link poolport:cancel/1}).
-spec cancel(pid(), reference()) -> ok.
cancel(Pool, Ref) ->
    _ = server_call(Pool, {cancel, Ref}, ?INFO_TIMEOUT),
    ok.

%% @doc {@link call/3} for a member of a group ({@link poolport_group}):
%% `{error, not_member}' if the pool is not in its group (its Python is
%% restarting), in which case the request was not written.
-spec member_call(pid(), binary(), timeout()) ->
          {ok, term()} | {error, poolport:reason() | not_member}.
member_call(Pool, Request, Timeout) ->
    request(Pool, member_call, Request, Timeout).

-spec request(poolport:pool(), call | member_call, binary(), timeout()) -> term().
request(Pool, Tag, Request, infinity) ->
    server_call(Pool, {Tag, Request, infinity}, infinity);
request(Pool, Tag, Request, Timeout0) ->
    Timeout = clamp_timeout(Timeout0),
    server_call(Pool, {Tag, Request, Timeout}, min(Timeout + ?CALLER_MARGIN, ?MAX_TIMEOUT)).

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

%% @doc A valid call timeout, clamped to the largest timer value.
%%
%% `infinity' and integers from 0 to 4294967295 (ms, about 49.7 days) are
%% returned unchanged, a larger integer as 4294967295. Anything else
%% (a negative integer, another atom, a float) raises `badarg'.
-spec clamp_timeout(timeout()) -> timeout().
clamp_timeout(infinity) ->
    infinity;
clamp_timeout(Timeout) when is_integer(Timeout), Timeout >= 0 ->
    min(Timeout, ?MAX_TIMEOUT);
clamp_timeout(Timeout) ->
    erlang:error(badarg, [Timeout]).

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
    %% Every log event of this process names its pool (logger metadata).
    logger:update_process_metadata(#{poolport_pool => case Cfg of
                                                         #{name := undefined} -> self();
                                                         #{name := Name} -> Name
                                                     end}),
    case open(Cfg) of
        {ok, Port, OsPid} ->
            case await_ready(attach(Port, OsPid, #state{cfg = Cfg})) of
                {ok, _} = Ok ->
                    ok = poolport_events:attach(self(), maps:get(name, Cfg), maps:get(events, Cfg)),
                    Ok;
                Stop ->
                    Stop
            end;
        {error, Reason} ->
            {stop, {open_port_failed, Reason}}
    end.

%% @private
-spec handle_call(term(), gen_server:from(), state()) ->
    {reply, term(), state()} | {noreply, state()}.
handle_call({call, _Request, _Timeout}, _From, #state{port = undefined} = State) ->
    {reply, {error, port_closed}, count_error(State#state{calls = State#state.calls + 1})};
handle_call({call, _Request, Timeout}, _From, State)
  when Timeout =/= infinity, not (is_integer(Timeout) andalso Timeout >= 0) ->
    %% Only a caller bypassing poolport:call/5 can send this; never crash on it.
    {reply, {error, badarg}, State};
handle_call({call, Request, Timeout0}, {Pid, _} = From, State0) ->
    Timeout = clamp_timeout(Timeout0),
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
                    {noreply, enqueue({call, MRef}, State#state{
                        pending = maps:put(MRef, {From, TRef}, State#state.pending)})};
                error ->
                    %% The port is dying; its exit message follows.
                    {reply, {error, port_closed}, count_error(State)}
            end
    end;
handle_call({stream, _Request, _Window, _Timeout}, _From, #state{port = undefined} = State) ->
    {reply, {error, port_closed}, count_error(State)};
handle_call({stream, Request, Window, Timeout}, {Pid, _} = From, State) ->
    #state{cfg = #{packet := Packet}, port = Port} = State,
    Frames = case Timeout of
                 infinity -> [Request];
                 _ -> [encode_timeout(Timeout), Request]
             end,
    case check_frame(Request, Packet) =:= ok andalso write(Port, Frames) of
        ok ->
            MRef = erlang:monitor(process, Pid),
            TRef = case Timeout of
                       infinity -> undefined;
                       _ -> erlang:send_after(Timeout, self(), {call_timeout, MRef})
                   end,
            {noreply, enqueue({stream, MRef, Window}, State#state{
                pending = maps:put(MRef, {From, TRef}, State#state.pending)})};
        false ->
            {reply, check_frame(Request, Packet), count_error(State)};
        error ->
            {reply, {error, port_closed}, count_error(State)}
    end;
handle_call({next, Ref, Timeout}, From, State) ->
    case maps:find(Ref, State#state.streams) of
        {ok, Stream} ->
            TRef = case Timeout of
                       infinity -> undefined;
                       _ -> erlang:send_after(Timeout, self(), {next_timeout, Ref})
                   end,
            case poolport_stream:next({From, TRef}, Stream) of
                {wait, Stream1} ->
                    {noreply, State#state{streams = maps:put(Ref, Stream1, State#state.streams)}};
                {busy, _} ->
                    cancel_timer(TRef),
                    {reply, {error, busy}, State};
                {Effects, Stream1} ->
                    {noreply, stream_effects(Ref, Effects, Stream1, State)}
            end;
        error ->
            {reply, {error, no_stream}, State}
    end;
handle_call({cancel, Ref}, _From, State) ->
    {reply, ok, cancel_stream(Ref, State)};
handle_call(info, _From, State) ->
    {reply, info_map(State), State};
handle_call({member_call, _Request, _Timeout}, _From, #state{joined = false} = State) ->
    {reply, {error, not_member}, State};
handle_call({member_call, Request, Timeout}, From, State) ->
    handle_call({call, Request, Timeout}, From, State);
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
            {noreply, enqueue(cast, State)};
        Failed ->
            ?LOG_WARNING("poolport ~p: cast not sent: ~p", [pool_id(State), Failed]),
            {noreply, count_error(State)}
    end;
handle_cast(_Request, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), state()) -> {noreply, state()} | {stop, term(), state()}.
handle_info({Port, {data, Data}}, #state{port = Port} = State) ->
    case handle_data(Data, State) of
        {ok, State1} -> {noreply, State1};
        {misaligned, Why} -> misaligned(Why, State)
    end;
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
handle_info({next_timeout, Ref}, State) ->
    case maps:find(Ref, State#state.streams) of
        {ok, Stream} ->
            {Effects, Stream1} = poolport_stream:timed_out(Stream),
            {noreply, stream_effects(Ref, Effects, Stream1, State)};
        error ->
            {noreply, State}
    end;
handle_info({'DOWN', MRef, process, _Pid, _Reason}, State) ->
    case maps:take(MRef, State#state.pending) of
        {{_From, TRef}, Pending} ->
            cancel_timer(TRef),
            {noreply, State#state{pending = Pending}};
        error ->
            %% A stream's consumer died: the stream is closed in Python.
            {noreply, cancel_stream(MRef, State)}
    end;
handle_info(reopen, #state{port = undefined} = State) ->
    reopen(State#state{reopen_timer = undefined});
handle_info(_Info, State) ->
    %% Stale messages of a previous port, the previous port's 'EXIT', ...
    {noreply, State}.

%% @private
-spec terminate(term(), state()) -> ok.
terminate(_Reason, State0) ->
    ok = poolport_events:detach(self(), maps:get(name, State0#state.cfg)),
    State = leave_group(State0),
    cancel_timer(State#state.reopen_timer),
    _ = fail_streams(port_closed, fail_pending(State)),
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

%% The port.

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
    ["-m", "poolport", Command] ++ ConfigArgs
        ++ ["--packet", integer_to_list(Packet), "--reply-tags"] ++ NameArgs ++ Extra ++ Args.

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
            case handle_data(Data, State) of
                {ok, State1} ->
                    {ok, State1};
                {misaligned, Why} ->
                    ?LOG_ERROR("poolport ~p: Python's first reply is misaligned (~p: expected "
                               "seq ~p, got ~p)", [pool_id(State), maps:get(why, Why),
                                                   maps:get(expected, Why), maps:get(got, Why)]),
                    close(Port, OsPid, 0),
                    {stop, {misaligned, Why}}
            end;
        {Port, {exit_status, Status}} ->
            Tail = diagnose(State#state.cfg),
            ?LOG_ERROR("poolport ~p: Python exited with status ~b during start; "
                       "`poolport check --init' with the same options says:~n~ts",
                       [pool_id(State), Status, Tail]),
            {stop, {python_exited, Status, Tail}};
        {'EXIT', Port, Reason} ->
            {stop, {port_exit, Reason}}
    after Timeout ->
        close(Port, OsPid, 0),
        {stop, {start_timeout, Timeout}}
    end.

%% Why Python could not start, in its own words. Its stderr went to the
%% node's, not to us, so the same interpreter runs `poolport check --init'
%% with the same options and environment, whose output (stderr included) names
%% what failed: a config key, a module that does not import, the worker_init
%% traceback, or "No module named poolport". Only on a failed start.
-spec diagnose(cfg()) -> binary().
diagnose(#{python := Python, env := Env, cd := Cd} = Cfg) ->
    Settings = [{args, command_args("check", ["--init"], Cfg)}, stream, binary, exit_status,
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
            {error, {protocol, 1, <<"FrameTooLarge">>, Detail, []}}
    end.

%% A freshly opened port: numbering starts again at 0, and the first request
%% is the pool's own '$poolport':info().
-spec attach(port(), non_neg_integer() | undefined, state()) -> state().
attach(Port, OsPid, State) ->
    send_sys_info(State#state{port = Port, os_pid = OsPid, queue = queue:new(), seq = 0}).

-spec send_sys_info(state()) -> state().
send_sys_info(#state{port = Port} = State) ->
    case write(Port, [encode_call('$poolport', info, [])]) of
        ok -> enqueue(sys_info, State);
        error -> State
    end.

%% Append an entry for a frame just written that Python will answer, with
%% the next request number.
-spec enqueue(entry(), state()) -> state().
enqueue(Entry, #state{queue = Queue, seq = Seq} = State) ->
    State#state{queue = queue:in({Seq, Entry}, Queue), seq = next_seq(Seq)}.

-spec next_seq(seq()) -> seq().
next_seq(Seq) ->
    (Seq + 1) band 16#FFFFFFFFFFFFFFFF.

-spec reopen(state()) -> {noreply, state()} | {stop, term(), state()}.
reopen(#state{cfg = Cfg} = State0) ->
    State = State0#state{restarts = State0#state.restarts + 1},
    case open(Cfg) of
        {ok, Port, OsPid} ->
            ?LOG_NOTICE("poolport ~p: Python restarted (os pid ~p, restart ~b)",
                        [pool_id(State), OsPid, State#state.restarts]),
            case poolport_events:handler(self()) of
                undefined -> ok;
                Handler -> _ = poolport_events:emit(Handler, [poolport, python, restart],
                                                    #{restarts => State#state.restarts},
                                                    #{pool => pool_id(State)})
            end,
            {noreply, attach(Port, OsPid, State)};
        {error, Reason} ->
            port_down({open_port_failed, Reason}, State)
    end.

%% The Python process is gone: fail the waiting callers with
%% `{error, port_closed}', then reopen the port after a backoff, or stop if
%% it died too often.
-spec port_down(term(), state()) -> {noreply, state()} | {stop, term(), state()}.
port_down(Why, State) ->
    restart(Why, port_closed, State).

%% A reply frame that does not belong to the head of the queue: nothing
%% Python sends on this port can be trusted any more. Fail every waiting
%% caller with `{error, misaligned}' (none of them may get a reply that is
%% not its own), close the port, have the OS process killed without
%% waiting for it here, and reopen like after a death of Python.
-spec misaligned(misalignment(), state()) -> {noreply, state()} | {stop, term(), state()}.
misaligned(#{why := What, expected := Expected, got := Got} = Why,
           #state{port = Port, os_pid = OsPid} = State) ->
    ?LOG_ERROR("poolport ~p: reply stream misaligned (~p: expected seq ~p, got ~p) with "
               "~b request(s) pending; failing ~b waiting caller(s) with {error, misaligned}, "
               "killing Python (os pid ~p) and reopening the port",
               [pool_id(State), What, Expected, Got, queue:len(State#state.queue),
                map_size(State#state.pending), OsPid]),
    discard(Port, OsPid),
    restart({misaligned, Why}, misaligned, State#state{misaligned = State#state.misaligned + 1}).

%% Fail the waiting callers with `{error, Error}', forget the port, then
%% reopen it after a backoff, or stop if that happened too often.
-spec restart(term(), port_closed | misaligned, state()) ->
          {noreply, state()} | {stop, term(), state()}.
restart(Why, Error, #state{cfg = Cfg} = State0) ->
    #{max_restarts := MaxRestarts, restart_period := Period} = Cfg,
    State1 = fail_streams(Error, fail_pending(Error, leave_group(State0))),
    Now = erlang:monotonic_time(millisecond),
    Deaths = recent([Now | State1#state.deaths], Now, Period * 1000),
    State = State1#state{port = undefined, os_pid = undefined, queue = queue:new(), seq = 0,
                         deaths = Deaths},
    case length(Deaths) > MaxRestarts of
        true ->
            ?LOG_ERROR("poolport ~p: Python ~s (~p), more than ~b times in ~b s; giving up",
                       [pool_id(State), gone(Why), Why, MaxRestarts, Period]),
            {stop, {restart_intensity, #{last_exit => Why, max_restarts => MaxRestarts,
                                         restart_period => Period}}, State};
        false ->
            Delay = backoff(length(Deaths)),
            ?LOG_ERROR("poolport ~p: Python ~s (~p) with ~b request(s) pending; "
                       "reopening in ~b ms",
                       [pool_id(State0), gone(Why), Why, queue:len(State0#state.queue), Delay]),
            TRef = erlang:send_after(Delay, self(), reopen),
            {noreply, State#state{reopen_timer = TRef}}
    end.

-spec gone(term()) -> string().
gone({misaligned, _}) -> "killed after a misaligned reply";
gone(_) -> "exited".

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

%% Replies.

%% `{info, timeout, [{ms, Ms}]}'; Python reads 0 as "no limit", so a zero
%% timeout is sent as 1 ms.
-spec encode_timeout(non_neg_integer()) -> binary().
encode_timeout(Ms) ->
    term_to_binary({info, timeout, [{ms, max(Ms, 1)}]}).

%% The ETF part of a reply frame; `undecodable' if it is no term at all.
%% A term of the wrong shape is still the answer to its request (the
%% caller gets a protocol error for it).
-spec decode_reply(binary()) -> reply() | undecodable.
decode_reply(Data) ->
    try binary_to_term(Data) of
        {reply, Result} -> {reply, Result};
        {noreply} -> noreply;
        {error, Error} -> {error, Error};
        Other -> {bad_reply, Other}
    catch
        error:badarg -> undecodable
    end.

%% Match a tagged reply frame, `<<Seq:64/big-unsigned, Etf/binary>>',
%% with the head of the queue: the head entry, the decoded reply and the
%% rest of the queue, or what makes it a misalignment.
-spec match_reply(binary(), queue:queue({seq(), entry()})) ->
          {ok, entry(), reply(), queue:queue({seq(), entry()})} | {misaligned, misalignment()}.
match_reply(<<Got:64/big-unsigned, Etf/binary>>, Queue) ->
    case queue:out(Queue) of
        {empty, _} ->
            {misaligned, #{why => empty_queue, expected => none, got => Got}};
        {{value, {Got, Entry}}, Rest} ->
            case decode_reply(Etf) of
                undecodable -> {misaligned, #{why => bad_term, expected => Got, got => Got}};
                Reply -> {ok, Entry, Reply, Rest}
            end;
        {{value, {Expected, _}}, _} ->
            {misaligned, #{why => seq_mismatch, expected => Expected, got => Got}}
    end;
match_reply(_Short, Queue) ->
    Expected = case queue:peek(Queue) of
                   {value, {Seq, _}} -> Seq;
                   empty -> none
               end,
    {misaligned, #{why => short_frame, expected => Expected, got => none}}.

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

%% A reply frame from the port: delivered to the head of the queue if it
%% is the head's, else the misalignment (the state is left as it was).
-spec handle_data(binary(), state()) -> {ok, state()} | {misaligned, misalignment()}.
handle_data(<<Id:64/big-unsigned, 131, 104, _, Atom, Rest/binary>> = Data, State)
  when Atom =:= 100; Atom =:= 115; Atom =:= 118; Atom =:= 119 ->
    case stream_frame(Atom, Rest) of
        true -> stream_data(Id, Data, State);
        false ->
            case callback_frame(Atom, Rest) of
                true -> callback_data(Data, State);
                false -> handle_reply(Data, State)
            end
    end;
handle_data(Data, State) ->
    handle_reply(Data, State).

-spec handle_reply(binary(), state()) -> {ok, state()} | {misaligned, misalignment()}.
handle_reply(<<Got:64/big-unsigned, _/binary>> = Data, State) ->
    case match_reply(Data, State#state.queue) of
        {ok, {stream, _, _}, {bad_reply, {stream, Id}}, _} when Id =/= Got ->
            {misaligned, #{why => seq_mismatch, expected => Got, got => Id}};
        {ok, Entry, Reply, Queue} -> {ok, deliver(Entry, Reply, State#state{queue = Queue})};
        {misaligned, _} = Misaligned -> Misaligned
    end;
handle_reply(Data, State) ->
    {misaligned, _} = match_reply(Data, State#state.queue).

%% Whether the ETF after `{' names a stream frame's atom (`stream_item',
%% `stream_end', `stream_error'): replies are `reply', `noreply', `error'
%% and `stream' (a stream's start), so the `_' tells them apart.
-spec stream_frame(100 | 115 | 118 | 119, binary()) -> boolean().
stream_frame(Short, <<_Len, "stream_", _/binary>>) when Short =:= 115; Short =:= 119 -> true;
stream_frame(Long, <<_:16, "stream_", _/binary>>) when Long =:= 100; Long =:= 118 -> true;
stream_frame(_, _) -> false.

%% Whether the ETF after `{' is the atom `callback': a handler calling back.
-spec callback_frame(100 | 115 | 118 | 119, binary()) -> boolean().
callback_frame(Short, <<8, "callback", _/binary>>) when Short =:= 115; Short =:= 119 -> true;
callback_frame(Long, <<0, 8, "callback", _/binary>>) when Long =:= 100; Long =:= 118 -> true;
callback_frame(_, _) -> false.

%% A handler calls `Module:Function(Args...)' on this node: run it in a
%% process of its own if the `callbacks' option allows it (the pool server
%% never waits for it), and send Python the result, or the error, as
%% `{callback_reply, Pid, N, Reply}'. A cast is acknowledged at once (`ok')
%% and runs on its own. Callback frames carry no request number (their tag
%% is 0): they are matched by Python's worker pid and counter.
-spec callback_data(binary(), state()) -> {ok, state()} | {misaligned, misalignment()}.
callback_data(<<Tag:64, Etf/binary>>, #state{port = Port, cfg = #{callbacks := Allowed}} = State) ->
    try binary_to_term(Etf) of
        {callback, Pid, N, Kind, M, F, Args, Timeout}
          when is_integer(Pid), is_integer(N), (Kind =:= call orelse Kind =:= cast), is_atom(M),
               is_atom(F), is_list(Args), is_integer(Timeout), Timeout > 0 ->
            case allowed(M, F, Allowed) of
                false ->
                    Reason = io_lib:format("~ts:~ts/~b is not in the pool's callbacks option",
                                           [M, F, length(Args)]),
                    send_callback_reply(Port, Pid, N, {error, error, Reason, ""});
                true when Kind =:= call ->
                    _ = proc_lib:spawn(fun() ->
                        send_callback_reply(Port, Pid, N, apply_within(M, F, Args, Timeout))
                    end),
                    ok;
                true ->
                    send_callback_reply(Port, Pid, N, ok),
                    Id = pool_id(State),
                    _ = proc_lib:spawn(fun() ->
                        case apply_within(M, F, Args, Timeout) of
                            {ok, _} -> ok;
                            {error, Class, Reason, _} ->
                                ?LOG_WARNING("poolport ~p: callback cast ~p:~p failed: ~p:~ts",
                                             [Id, M, F, Class, Reason])
                        end
                    end),
                    ok
            end,
            {ok, State};
        _ ->
            {misaligned, #{why => bad_term, expected => none, got => Tag}}
    catch
        error:badarg -> {misaligned, #{why => bad_term, expected => none, got => Tag}}
    end.

-spec allowed(atom(), atom(), [module() | {module(), atom()}]) -> boolean().
allowed(M, F, Allowed) ->
    lists:member(M, Allowed) orelse lists:member({M, F}, Allowed).

%% Run `M:F(Args...)' in a process of its own, killed after `Timeout' ms.
-spec apply_within(atom(), atom(), list(), pos_integer()) ->
          {ok, term()} | {error, atom(), iodata(), iodata()}.
apply_within(M, F, Args, Timeout) ->
    Parent = self(),
    {Pid, MRef} = spawn_monitor(fun() ->
        Parent ! {self(), try {ok, apply(M, F, Args)}
                          catch Class:Reason:Stack ->
                              {error, Class, io_lib:format("~0tP", [Reason, 30]),
                               io_lib:format("~0tP", [Stack, 30])}
                          end}
    end),
    receive
        {Pid, Result} ->
            erlang:demonitor(MRef, [flush]),
            Result;
        {'DOWN', MRef, process, Pid, Reason} ->
            {error, exit, io_lib:format("~0tP", [Reason, 30]), ""}
    after min(Timeout, ?MAX_TIMEOUT) ->
        exit(Pid, kill),
        erlang:demonitor(MRef, [flush]),
        {error, exit, io_lib:format("timeout: the callback ran past its ~b ms", [Timeout]), ""}
    end.

%% Send a callback's answer to Python on the port it came from (nothing if
%% that port has closed since: the worker that asked is gone with it).
-spec send_callback_reply(port() | undefined, integer(), integer(),
                          ok | {ok, term()} | {error, atom(), iodata(), iodata()}) -> ok.
send_callback_reply(undefined, _Pid, _N, _Reply) ->
    ok;
send_callback_reply(Port, Pid, N, Reply) ->
    Term = case Reply of
               {error, Class, Reason, Stack} ->
                   {error, Class, unicode:characters_to_binary(Reason),
                    unicode:characters_to_binary(Stack)};
               _ -> Reply
           end,
    Frame = term_to_binary({callback_reply, Pid, N, Term}),
    _ = write(Port, [Frame]),
    ok.

%% A frame of a stream, tagged with the stream's number: to its stream, or
%% dropped if the stream was cancelled; a number that is no stream's is a
%% misalignment like a reply with a wrong number.
-spec stream_data(seq(), binary(), state()) -> {ok, state()} | {misaligned, misalignment()}.
stream_data(Id, <<_:64, Etf/binary>>, #state{stream_ids = Ids} = State) ->
    Event = try binary_to_term(Etf) of
                {stream_item, Id, Item} -> {item, Item};
                {stream_end, Id} -> done;
                {stream_error, Id, Error} -> {error, Error};
                _ -> bad
            catch
                error:badarg -> bad
            end,
    Last = case Event of
               done -> true;
               {error, _} -> true;
               _ -> false
           end,
    case {maps:find(Id, Ids), Event} of
        {_, bad} ->
            {misaligned, #{why => bad_term, expected => Id, got => Id}};
        {error, _} ->
            {misaligned, #{why => unknown_stream, expected => none, got => Id}};
        {{ok, cancelled}, _} when Last ->
            {ok, State#state{stream_ids = maps:remove(Id, Ids)}};
        {{ok, cancelled}, _} ->
            {ok, State};
        {{ok, Ref}, _} ->
            State1 = case Last of
                         true -> State#state{stream_ids = maps:remove(Id, Ids)};
                         false -> State
                     end,
            case maps:find(Ref, State1#state.streams) of
                {ok, Stream} ->
                    {Effects, Stream1} = poolport_stream:event(Event, Stream),
                    {ok, stream_effects(Ref, Effects, Stream1, State1)};
                error ->
                    {ok, State1}
            end
    end.

%% Apply what poolport_stream asked for: answer the waiting consumer, hand
%% credit back to Python, forget a stream whose last result was taken.
-spec stream_effects(reference(), map(), poolport_stream:stream(), state()) -> state().
stream_effects(Ref, Effects, Stream, State) ->
    case Effects of
        #{reply := {{From, TRef}, Result}} ->
            cancel_timer(TRef),
            gen_server:reply(From, Result);
        #{} ->
            ok
    end,
    case Effects of
        #{credit := N} -> write_control({stream_credit, poolport_stream:id(Stream), N}, State);
        #{} -> ok
    end,
    case Effects of
        #{finished := true} ->
            erlang:demonitor(Ref, [flush]),
            State#state{streams = maps:remove(Ref, State#state.streams)};
        #{} ->
            State#state{streams = maps:put(Ref, Stream, State#state.streams)}
    end.

%% Close a stream for its consumer (cancel/1, or the consumer died): Python
%% closes the generator; its frames until the last one are dropped.
-spec cancel_stream(reference(), state()) -> state().
cancel_stream(Ref, #state{streams = Streams, stream_ids = Ids} = State) ->
    case maps:take(Ref, Streams) of
        {Stream, Rest} ->
            erlang:demonitor(Ref, [flush]),
            Id = poolport_stream:id(Stream),
            case poolport_stream:timed_out(Stream) of  % a next/2 waiting in another process
                {#{reply := {{From, _}, _}}, _} -> gen_server:reply(From, {error, cancelled});
                {#{}, _} -> ok
            end,
            case maps:find(Id, Ids) of
                {ok, Ref} ->
                    write_control({stream_cancel, Id}, State),
                    State#state{streams = Rest, stream_ids = maps:put(Id, cancelled, Ids)};
                _ ->
                    State#state{streams = Rest}  % ended already, or on a previous port
            end;
        error ->
            State
    end.

%% A stream control frame: no reply comes for it, so it takes no number.
-spec write_control(tuple(), state()) -> ok.
write_control(_Control, #state{port = undefined}) ->
    ok;
write_control(Control, #state{port = Port}) ->
    _ = write(Port, [term_to_binary(Control)]),
    ok.

%% The port is gone: every open stream ends with `{error, Error}' after the
%% items it holds.
-spec fail_streams(port_closed | misaligned, state()) -> state().
fail_streams(Error, #state{streams = Streams} = State0) ->
    maps:fold(fun(Ref, Stream, State) ->
                      {Effects, Stream1} = poolport_stream:fail(Error, Stream),
                      stream_effects(Ref, maps:remove(credit, Effects), Stream1, State)
              end, State0#state{stream_ids = #{}}, Streams).

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
deliver({stream, MRef, Window}, Reply, State) ->
    case {maps:take(MRef, State#state.pending), Reply} of
        {{{From, TRef}, Pending}, {bad_reply, {stream, Id}}} when is_integer(Id) ->
            cancel_timer(TRef),
            gen_server:reply(From, {ok, {poolport_stream, self(), MRef}}),
            %% The caller's monitor stays: it is the stream's consumer.
            State#state{pending = Pending,
                        streams = maps:put(MRef, poolport_stream:new(Id, Window), State#state.streams),
                        stream_ids = maps:put(Id, MRef, State#state.stream_ids)};
        {error, {bad_reply, {stream, Id}}} when is_integer(Id) ->
            %% The caller gave up or died before the stream started.
            write_control({stream_cancel, Id}, State),
            State#state{dropped = State#state.dropped + 1,
                        stream_ids = maps:put(Id, cancelled, State#state.stream_ids)};
        {{{_From, _TRef}, _}, _} ->
            deliver({call, MRef}, Reply, State);
        {error, _} ->
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
    join_group(State#state{workers = Workers, server = Info});
deliver(sys_info, Reply, State) ->
    ?LOG_INFO("poolport ~p: '$poolport':info() answered ~0P", [pool_id(State), Reply, 30]),
    join_group(State).

%% Python answered: join the pool's group, if it has one.
-spec join_group(state()) -> state().
join_group(#state{cfg = #{group := undefined}} = State) ->
    State;
join_group(#state{joined = true} = State) ->
    State;
join_group(#state{cfg = #{group := Group}} = State) ->
    case poolport_group:join(Group) of
        ok ->
            State#state{joined = true};
        {error, Reason} ->
            ?LOG_ERROR("poolport ~p: cannot join group ~p: ~p", [pool_id(State), Group, Reason]),
            State
    end.

%% Python is gone or the pool stops: leave the group.
-spec leave_group(state()) -> state().
leave_group(#state{joined = false} = State) ->
    State;
leave_group(#state{cfg = #{group := Group}} = State) ->
    ok = poolport_group:leave(Group),
    State#state{joined = false}.

%% Reply {error, port_closed} to every waiting caller.
-spec fail_pending(state()) -> state().
fail_pending(State) ->
    fail_pending(port_closed, State).

%% Reply {error, Error} to every waiting caller.
-spec fail_pending(port_closed | misaligned, state()) -> state().
fail_pending(Error, #state{pending = Pending} = State) ->
    maps:foreach(
        fun(MRef, {From, TRef}) ->
            cancel_timer(TRef),
            erlang:demonitor(MRef, [flush]),
            gen_server:reply(From, {error, Error})
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
      misaligned => State#state.misaligned,
      streams => map_size(State#state.streams),
      os_pid => State#state.os_pid,
      status => case State#state.port of undefined -> restarting; _ -> running end,
      packet => maps:get(packet, Cfg),
      python => maps:get(python, Cfg),
      config => maps:get(config, Cfg),
      group => maps:get(group, Cfg),
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
                 port_args(cfg(#{config => undefined, name => my_pool}))).

tail_test_() ->
    Many = iolist_to_binary([[integer_to_list(I), "\n"] || I <- lists:seq(1, 30)]),
    Long = binary:copy(<<"\x{e9}"/utf8>>, 3000),  % 6000 bytes of 2-byte characters
    [?_assertEqual(<<"a\nb">>, tail(<<"\n\na\n\nb\n">>)),
     ?_assertEqual(iolist_to_binary(lists:join("\n", [integer_to_list(I) || I <- lists:seq(11, 30)])),
                   tail(Many)),
     ?_assertEqual(binary:copy(<<"\x{e9}"/utf8>>, 2000), tail(<<0, Long/binary>>)),  % whole characters
     ?_assertEqual(<<>>, tail(<<>>))].

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
     ?_assertEqual(undecodable, decode_reply(<<1, 2, 3>>)),
     ?_assertEqual(undecodable, decode_reply(<<>>))].

%% A tagged reply frame: Seq, then the ETF of Term.
tagged(Seq, Term) ->
    <<Seq:64/big-unsigned, (term_to_binary(Term))/binary>>.

match_reply_test_() ->
    Q = queue:from_list([{7, sys_info}, {8, cast}]),
    {_, Rest} = queue:out(Q),
    [{"the head's number: delivered",
      ?_assertMatch({ok, sys_info, {reply, x}, Rest}, match_reply(tagged(7, {reply, x}), Q))},
     {"a wrong shape is still the head's reply",
      ?_assertMatch({ok, sys_info, {bad_reply, {what}}, _}, match_reply(tagged(7, {what}), Q))},
     {"a later number (a reply was lost)",
      ?_assertEqual({misaligned, #{why => seq_mismatch, expected => 7, got => 8}},
                    match_reply(tagged(8, noreply), Q))},
     {"an earlier number (a reply was sent twice)",
      ?_assertEqual({misaligned, #{why => seq_mismatch, expected => 7, got => 6}},
                    match_reply(tagged(6, {reply, x}), Q))},
     {"the highest number",
      ?_assertEqual({misaligned, #{why => seq_mismatch, expected => 7,
                                   got => 16#FFFFFFFFFFFFFFFF}},
                    match_reply(tagged(16#FFFFFFFFFFFFFFFF, {reply, x}), Q))},
     {"no request pending",
      ?_assertEqual({misaligned, #{why => empty_queue, expected => none, got => 0}},
                    match_reply(tagged(0, {reply, x}), queue:new()))},
     {"shorter than a tag",
      ?_assertEqual({misaligned, #{why => short_frame, expected => 7, got => none}},
                    match_reply(<<0, 0, 0, 0, 0, 0, 7>>, Q))},
     {"empty frame, empty queue",
      ?_assertEqual({misaligned, #{why => short_frame, expected => none, got => none}},
                    match_reply(<<>>, queue:new()))},
     {"an untagged reply (Python without --reply-tags)",
      ?_assertMatch({misaligned, #{}}, match_reply(term_to_binary({reply, 42}), Q))},
     {"the right number, then no term",
      ?_assertEqual({misaligned, #{why => bad_term, expected => 7, got => 7}},
                    match_reply(<<7:64, 1, 2, 3>>, Q))},
     {"the right number, nothing after it",
      ?_assertEqual({misaligned, #{why => bad_term, expected => 7, got => 7}},
                    match_reply(<<7:64>>, Q))}].

next_seq_test_() ->
    [?_assertEqual(1, next_seq(0)),
     ?_assertEqual(0, next_seq(16#FFFFFFFFFFFFFFFF))].

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
     ?_assertMatch({error, {protocol, 1, <<"FrameTooLarge">>, _, []}},
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
%% their own reply; a reply with no request pending is a misalignment.
fifo_test() ->
    Self = self(),
    Tag2 = make_ref(),
    M1 = erlang:monitor(process, Self),
    M2 = erlang:monitor(process, Self),
    State0 = #state{cfg = cfg(#{}),
                    queue = queue:from_list([{0, sys_info}, {1, {call, M1}}, {2, cast},
                                             {3, {call, M2}}]),
                    seq = 4,
                    pending = #{M2 => {{Self, Tag2}, undefined}}},
    {ok, S1} = handle_data(tagged(0, {reply, #{workers => 3}}), State0),
    ?assertEqual(3, S1#state.workers),
    {ok, S2} = handle_data(tagged(1, {reply, late}), S1),
    ?assertEqual(1, S2#state.dropped),
    {ok, S3} = handle_data(tagged(2, {noreply}), S2),
    ?assertEqual(0, S3#state.errors),
    {ok, S4} = handle_data(tagged(3, {error, {user, 0, <<"E">>, <<>>, []}}), S3),
    ?assertEqual(1, S4#state.errors),
    ?assertEqual(#{}, S4#state.pending),
    ?assert(queue:is_empty(S4#state.queue)),
    receive {Tag2, Reply} -> ?assertEqual({error, {user, 0, <<"E">>, <<>>, []}}, Reply)
    after 0 -> ?assert(false)
    end,
    erlang:demonitor(M1, [flush]),
    ?assertEqual({misaligned, #{why => empty_queue, expected => none, got => 4}},
                 handle_data(tagged(4, {reply, stray}), S4)).

%% A reply with another caller's number reaches nobody: it is not delivered
%% to the head, and the head's caller is not answered by handle_data/2.
mismatch_delivers_nothing_test() ->
    Tag = make_ref(),
    MRef = erlang:monitor(process, self()),
    State = #state{cfg = cfg(#{}), queue = queue:from_list([{5, {call, MRef}}]), seq = 6,
                   pending = #{MRef => {{self(), Tag}, undefined}}},
    ?assertMatch({misaligned, #{why := seq_mismatch, expected := 5, got := 6}},
                 handle_data(tagged(6, {reply, not_yours}), State)),
    receive {Tag, R} -> ?assertEqual(no_reply_expected, R) after 0 -> ok end,
    erlang:demonitor(MRef, [flush]).

%% Numbering of written frames: sys_info, calls and casts count, the
%% {info, timeout, _} frame before a call does not; a reopened port starts
%% at 0 again.
numbering_test() ->
    Port = open_port({spawn_executable, "/bin/cat"}, [{packet, 4}, binary, exit_status]),
    try
        {os_pid, OsPid} = erlang:port_info(Port, os_pid),
        S0 = attach(Port, OsPid, #state{cfg = cfg(#{}), seq = 41}),
        Req = encode_call(m, f, []),
        {noreply, S1} = handle_call({call, Req, infinity}, {self(), make_ref()}, S0),
        {noreply, S2} = handle_cast({cast, encode_cast(m, f, [])}, S1),
        {noreply, S3} = handle_call({call, Req, 100}, {self(), make_ref()}, S2),
        ?assertMatch([{0, sys_info}, {1, {call, _}}, {2, cast}, {3, {call, _}}],
                     queue:to_list(S3#state.queue)),
        ?assertEqual(4, S3#state.seq),
        %% What Python received: 5 frames, the 4th an info packet.
        Frames = [receive {Port, {data, F}} -> binary_to_term(F) after 5000 -> timeout end
                  || _ <- lists:seq(1, 5)],
        ?assertMatch([{call, '$poolport', info, []}, {call, m, f, []}, {cast, m, f, []},
                      {info, timeout, [{ms, 100}]}, {call, m, f, []}], Frames),
        S4 = attach(Port, OsPid, S3),
        ?assertEqual([{0, sys_info}], queue:to_list(S4#state.queue)),
        _ = fail_pending(S4)
    after
        catch port_close(Port)
    end,
    flush_timeouts().

%% A misaligned reply: every waiting caller gets {error, misaligned} (the
%% one at the head too), the port is closed, the OS process killed, the
%% counter and the reopen timer set.
misaligned_test() ->
    process_flag(trap_exit, true),
    Port = open_port({spawn_executable, "/bin/sh"},
                     [{args, ["-c", "trap '' TERM; exec sleep 60"]}, {packet, 4}, binary,
                      exit_status]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    Tags = [make_ref(), make_ref()],
    MRefs = [erlang:monitor(process, self()) || _ <- Tags],
    State = #state{cfg = cfg(#{}), port = Port, os_pid = OsPid,
                   queue = queue:from_list([{0, {call, M}} || M <- MRefs] ++ [{2, cast}]),
                   seq = 3,
                   pending = maps:from_list([{M, {{self(), T}, undefined}}
                                             || {M, T} <- lists:zip(MRefs, Tags)])},
    %% The reply to request 1 while request 0 is at the head.
    {noreply, S} = handle_info({Port, {data, tagged(1, {reply, not_yours})}}, State),
    [receive {T, R} -> ?assertEqual({error, misaligned}, R) after 0 -> ?assert(false) end
     || T <- Tags],
    ?assertMatch(#{misaligned := 1, waiting := 0, in_flight := 0, status := restarting,
                   errors := 2, restarts := 0}, info_map(S)),
    ?assertEqual(0, S#state.seq),
    ?assertEqual(undefined, erlang:port_info(Port)),
    ?assert(is_reference(S#state.reopen_timer)),
    %% SIGTERM is ignored: the helper goes on to SIGKILL.
    ?assert(wait_exit(OsPid, 10000)),
    _ = erlang:cancel_timer(S#state.reopen_timer),
    receive reopen -> ok after 0 -> ok end,
    receive {'EXIT', Port, _} -> ok after 0 -> ok end,
    process_flag(trap_exit, false).

%% Too many misalignments stop the pool like too many deaths of Python.
misaligned_intensity_test() ->
    Port = open_port({spawn_executable, "/bin/cat"}, [{packet, 4}, binary]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    State = #state{cfg = cfg(#{max_restarts => 0}), port = Port, os_pid = OsPid,
                   queue = queue:from_list([{0, sys_info}]), seq = 1},
    ?assertMatch({stop, {restart_intensity, #{last_exit := {misaligned, #{why := short_frame}},
                                              max_restarts := 0}}, _},
                 handle_info({Port, {data, <<1, 2>>}}, State)),
    ?assert(wait_exit(OsPid, 10000)).

%% Stream frames go to the stream their tag names: a start naming another
%% number, a tag that is no open stream's, or a frame whose stream number is
%% not its tag, is a misalignment.
stream_frames_test() ->
    Tag = make_ref(),
    MRef = erlang:monitor(process, self()),
    State = #state{cfg = cfg(#{}), queue = queue:from_list([{3, {stream, MRef, 4}}]), seq = 4,
                   pending = #{MRef => {{self(), Tag}, undefined}}},
    ?assertMatch({misaligned, #{why := seq_mismatch, expected := 3, got := 2}},
                 handle_data(tagged(3, {stream, 2}), State)),
    {ok, S1} = handle_data(tagged(3, {stream, 3}), State),
    Self = self(),
    receive {Tag, R} -> ?assertEqual({ok, {poolport_stream, Self, MRef}}, R) after 0 -> ?assert(false) end,
    {ok, S2} = handle_data(tagged(3, {stream_item, 3, a}), S1),
    ?assertMatch({misaligned, #{why := unknown_stream, got := 9}},
                 handle_data(tagged(9, {stream_item, 9, a}), S2)),
    ?assertMatch({misaligned, #{why := bad_term}}, handle_data(tagged(3, {stream_item, 4, a}), S2)),
    %% A reply frame still goes to the head of the queue (empty here).
    ?assertMatch({misaligned, #{why := empty_queue}}, handle_data(tagged(3, {reply, a}), S2)),
    {ok, S3} = handle_data(tagged(3, {stream_end, 3}), S2),
    ?assertEqual(#{}, S3#state.stream_ids),
    Next = fun(St) ->
               T = make_ref(),
               {noreply, St1} = handle_call({next, MRef, infinity}, {self(), T}, St),
               receive {T, Reply} -> {Reply, St1} after 0 -> {none, St1} end
           end,
    {{ok, a}, S4} = Next(S3),
    {done, S5} = Next(S4),
    ?assertEqual(#{}, S5#state.streams),
    ?assertEqual({reply, {error, no_stream}, S5},
                 handle_call({next, MRef, infinity}, {self(), make_ref()}, S5)).

flush_timeouts() ->
    receive {call_timeout, _} -> flush_timeouts() after 0 -> ok end.

fail_pending_test() ->
    Tag = make_ref(),
    MRef = erlang:monitor(process, self()),
    S = fail_pending(#state{cfg = cfg(#{}), pending = #{MRef => {{self(), Tag}, undefined}}}),
    ?assertEqual(#{}, S#state.pending),
    ?assertEqual(1, S#state.errors),
    receive {Tag, R} -> ?assertEqual({error, port_closed}, R) after 0 -> ?assert(false) end,
    Tag2 = make_ref(),
    MRef2 = erlang:monitor(process, self()),
    S2 = fail_pending(misaligned, S#state{pending = #{MRef2 => {{self(), Tag2}, undefined}}}),
    ?assertEqual(2, S2#state.errors),
    receive {Tag2, R2} -> ?assertEqual({error, misaligned}, R2) after 0 -> ?assert(false) end.

-endif.
