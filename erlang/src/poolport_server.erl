%% @doc The pool process: owns the port to `python -m poolport serve'.
%%
%% ```
%%  callers ──{call, Alias, ...}──▶ poolport_server ──frames──▶ port ──▶ Python
%%     ▲                              │  FIFO of entries              │
%%     └───────── Alias ! Reply ──────┘◀──────── replies in order ────┘
%% '''
%%
%% The pool process only moves bytes; everything per call that can run in
%% the caller does. A caller encodes its request ({@link poolport_wire}),
%% sends it and its timeout with a process alias that is also a monitor of
%% the pool (`monitor(process, Pool, [{alias, demonitor}])'), and waits for
%% the reply with its own timer. The server writes the request to the port
%% at once, after a timeout packet unless Python already applies that
%% timeout (frames/3), and appends an entry to a FIFO queue. Python
%% answers every call and cast frame exactly once, in request order, so
%% each reply frame belongs to the entry at the head of the queue. Entries:
%% <ul>
%% <li>`{call, Alias, Pid}': a caller. A `{reply, _}' frame is sent to
%%   `Alias' undecoded, and the caller decodes it; an error reply is
%%   decoded here (to count errors and timeouts) and sent as
%%   `{error, Reason}'. No timer and no monitor per call: when the caller's
%%   own timeout expires it deactivates the alias (a late reply is then
%%   discarded by the runtime, never found in its mailbox) and tells the
%%   pool, which counts the timeout and drops the reply when it comes;
%%   Python stops the call at the same timeout (the timeout packet). A
%%   caller that died has its reply dropped as well.</li>
%% <li>`{stream, MRef, Window}': a stream's start (see {@link poolport_stream});
%%   its consumer is monitored and kept in `pending' until the start comes.
%%   The stream's items then arrive outside the queue, tagged with the
%%   stream's number.</li>
%% <li>`cast': the reply is `{noreply}' (or an error, which is logged).</li>
%% <li>`sys_info': the pool's own `'$poolport':info()' call, sent after
%%   each (re)opening of the port.</li>
%% <li>`{sys_call, From, Function}': a `'$poolport':Function(...)' operation
%%   ({@link sys_call/4}: statistics, resize, reload); not counted as a call.
%%   The latest `stats' answer is kept for {@link poolport:info/1}.</li>
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
%% `Etf' part the pool decodes that is no term) is a misalignment (a
%% `{reply, _}' whose rest is no term reaches its own caller, by its number,
%% as a `protocol' error): it is logged, counted
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
%% Use the {@link poolport} module; this one is its implementation, with
%% {@link poolport_opts} (options), {@link poolport_wire} (frames) and
%% {@link poolport_os} (the Python OS process).
-module(poolport_server).
-behaviour(gen_server).

%% API.
-export([start_link/1]).
-export([call/3]).
-export([member_call/3]).
-export([cast/2]).
-export([info/1]).
-export([sys_call/4]).
-export([clamp_timeout/1]).
-export([deadline/1]).
-export([remaining/1]).
-export([stream/4]).
-export([next/3]).
-export([cancel/2]).
-ifdef(TEST).
-export([gave_up_count/1]).
-endif.

%% gen_server.
-export([init/1]).
-export([handle_call/3]).
-export([handle_cast/2]).
-export([handle_info/2]).
-export([terminate/2]).
-export([code_change/3]).

-include_lib("kernel/include/logger.hrl").

%% The messages of a call: a caller's request, and a caller that gave up.
-define(CALL, '$poolport_call').
-define(GAVE_UP, '$poolport_gave_up').
%% Extra time a stream's consumer waits beyond its timeout for the server's
%% own `{error, timeout}' before it gives up itself (only if the server is stuck).
-define(CALLER_MARGIN, 1000).
%% Largest call timeout (ms, about 49.7 days): the largest value every OTP
%% release accepts in `erlang:send_after/3' and in `receive ... after'
%% (which `gen_server:call/3' uses). Longer timeouts are clamped to it.
-define(MAX_TIMEOUT, 4294967295).
%% How long info/1 waits for the pool (gen_server:call/2's default).
-define(INFO_TIMEOUT, 5000).
%% How long info/1 waits for Python's fresh statistics before it shows the
%% latest it has (a long call ahead of the request in reply order holds it up).
-define(STATS_WAIT, 1000).
%% First reopen delay after the Python process died, doubled on each
%% further death within the restart period.
-define(BACKOFF_MIN, 100).
%% Ceiling of the reopen delay.
-define(BACKOFF_MAX, 5000).

-type entry() :: {call, reference(), pid()} | {stream, reference(), pos_integer()} | cast | sys_info
               | {sys_call, gen_server:from(), atom()}.

-record(state, {
    cfg :: poolport_opts:cfg(),
    port :: port() | undefined,
    os_pid :: non_neg_integer() | undefined,
    %% Requests written to the port and not answered yet, oldest first,
    %% each with its number.
    queue = queue:new() :: queue:queue({poolport_wire:seq(), entry()}),
    %% Number of the next request written to the current port.
    seq = 0 :: poolport_wire:seq(),
    %% Calls in the queue, and the aliases of those whose caller gave up
    %% (timed out): their replies are dropped. `gave_up_at' holds each with
    %% the number of the next request when the pool heard of it: its call is
    %% older, so once that request is answered the alias is forgotten, even
    %% if its reply went out before the caller gave up.
    calls_queued = 0 :: non_neg_integer(),
    gave_up = #{} :: #{reference() => true},
    gave_up_at = queue:new() :: queue:queue({poolport_wire:seq(), reference()}),
    %% The timeout packet made last, with its timeout.
    last_packet = {infinity, <<>>} :: {timeout(), binary()},
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
    %% Python's latest answer to '$poolport':stats(), and when it came
    %% (monotonic ms).
    stats = #{} :: map(),
    stats_at :: integer() | undefined,
    %% Callers waiting for a stream to start (its consumer's monitor =>
    %% {From, start timeout timer}); plain calls are not kept here.
    pending = #{} :: #{reference() => {gen_server:from(), reference() | undefined}},
    %% Open streams by their consumer's monitor, and their numbers on the
    %% current port (a cancelled stream keeps its number, mapped to
    %% `cancelled', until Python's last frame for it).
    streams = #{} :: #{reference() => poolport_stream:stream()},
    stream_ids = #{} :: #{poolport_wire:seq() => reference() | cancelled}
}).

-type state() :: #state{}.

%% API.

%% @doc Start a pool from options already checked by {@link poolport_opts:prepare/1}.
-spec start_link(poolport_opts:cfg()) -> {ok, pid()} | {error, term()}.
start_link(#{name := undefined} = Cfg) ->
    gen_server:start_link(?MODULE, Cfg, []);
start_link(#{name := Name} = Cfg) ->
    gen_server:start_link({local, Name}, ?MODULE, Cfg, []).

%% @doc Send an encoded call to a pool and wait for its result.
%%
%% The caller enforces `Timeout' itself (and Python too, from the timeout
%% packet sent before the call). The wait uses a process alias (OTP 24+):
%% a reply arriving after the caller gave up is discarded by the runtime.
%%
%% A pool that does not exist (a dead pid, a name nobody registered) gives
%% `{error, noproc}', a pool on a node that cannot be reached
%% `{error, {nodedown, Node}}'; a pool that crashes while the call is
%% pending exits the caller with `{Reason, {poolport_server, call, [Pool]}}',
%% as a `gen_server:call/3' would.
-spec call(poolport:pool(), binary(), timeout()) -> {ok, term()} | {error, poolport:reason()}.
call(Pool, Request, Timeout) ->
    request(Pool, call, Request, Timeout).

%% @doc {@link call/3} for a member of a group ({@link poolport_group}):
%% `{error, not_member}' if the pool is not in its group (its Python is
%% restarting), in which case the request was not written.
-spec member_call(pid(), binary(), timeout()) ->
          {ok, term()} | {error, poolport:reason() | not_member}.
member_call(Pool, Request, Timeout) ->
    request(Pool, member_call, Request, Timeout).

-spec request(poolport:pool(), call | member_call, binary(), timeout()) -> term().
request(Pool, Kind, Request, Timeout0) ->
    Timeout = clamp_timeout(Timeout0),
    case where(Pool) of
        {error, _} = Error ->
            Error;
        Dest ->
            Alias = erlang:monitor(process, Dest, [{alias, demonitor}]),
            %% A name nobody registered makes send/3 fail: the monitor says noproc.
            _ = catch erlang:send(Dest, {?CALL, Kind, Alias, self(), Timeout, Request}, [noconnect]),
            await(Dest, Alias, Timeout)
    end.

%% Wait for the answer to a request sent with `Alias' (a monitor of `Dest'
%% that is also an alias); on timeout, tell `Dest' the caller gave up.
-spec await(pid() | atom() | {atom(), node()}, reference(), timeout()) -> term().
await(Dest, Alias, Timeout) ->
    receive
        {Alias, Etf} when is_binary(Etf) ->
            erlang:demonitor(Alias, [flush]),
            poolport_wire:read_result(Etf);
        {Alias, Result} ->
            erlang:demonitor(Alias, [flush]),
            Result;
        {'DOWN', Alias, process, _, noconnection} ->
            {error, {nodedown, dest_node(Dest)}};
        {'DOWN', Alias, process, _, noproc} ->
            {error, noproc};
        {'DOWN', Alias, process, _, Reason} ->
            exit({Reason, {?MODULE, call, [Dest]}})
    after Timeout ->
        erlang:demonitor(Alias, [flush]),
        receive
            {Alias, Etf} when is_binary(Etf) -> poolport_wire:read_result(Etf);
            {Alias, Result} -> Result
        after 0 ->
            _ = catch erlang:send(Dest, {?GAVE_UP, Alias}, [noconnect]),
            {error, timeout}
        end
    end.

%% Where to send a request: what monitor/3 and send/3 take (as gen:call/4
%% finds it).
-spec where(poolport:pool()) -> pid() | atom() | {atom(), node()} | {error, noproc | {nodedown, node()}}.
where({global, Name}) -> registered(global:whereis_name(Name));
where({via, Module, Name}) -> registered(Module:whereis_name(Name));
where({_Name, Node}) when node() =:= nonode@nohost, Node =/= nonode@nohost -> {error, {nodedown, Node}};
where(Pool) -> Pool.

-spec registered(pid() | undefined) -> pid() | {error, noproc}.
registered(Pid) when is_pid(Pid) -> Pid;
registered(_) -> {error, noproc}.

-spec dest_node(pid() | atom() | {atom(), node()}) -> node().
dest_node(Pid) when is_pid(Pid) -> node(Pid);
dest_node({_, Node}) -> Node;
dest_node(_) -> node().

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

%% @doc Send an encoded cast to a pool.
%%
%% `gen_server:cast/2' never fails: a cast to a pool that does not exist or
%% sits on an unreachable node is silently lost.
-spec cast(poolport:pool(), binary()) -> ok.
cast(Pool, Request) ->
    gen_server:cast(Pool, {cast, Request}).

%% @doc The pool's counters and Python's statistics;
%% `{error, noproc | {nodedown, Node} | timeout}' if there is no pool or it
%% did not answer within 5 s.
%%
%% Python is asked for fresh statistics first (at most 1 s: its
%% answer takes its turn in reply order, behind the calls sent before it);
%% if they do not come in time, the latest the pool has are shown, and
%% `stats_age_ms' says how old they are.
-spec info(poolport:pool()) -> map() | {error, noproc | {nodedown, node()} | timeout}.
info(Pool) ->
    _ = sys_call(Pool, stats, [], ?STATS_WAIT),
    server_call(Pool, info, ?INFO_TIMEOUT).

%% @doc Call `'$poolport':Function(Args...)', one of the operations Python's
%% dispatcher answers itself (see the README's protocol section). Not counted
%% in `calls'; `{error, port_closed}' while Python is restarting.
-spec sys_call(poolport:pool(), atom(), list(), timeout()) -> {ok, term()} | {error, term()}.
sys_call(Pool, Function, Args, Timeout) ->
    server_call(Pool, {sys_call, Function, poolport_wire:encode_call('$poolport', Function, Args)}, Timeout).

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

%% @doc When a wait of `Timeout' ms that starts now ends (monotonic ms), for
%% waits made of several steps ({@link remaining/1}).
-spec deadline(timeout()) -> integer() | infinity.
deadline(infinity) -> infinity;
deadline(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

%% @doc The ms left until `Deadline' (0 once it has passed).
-spec remaining(integer() | infinity) -> timeout().
remaining(infinity) -> infinity;
remaining(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

%% gen_server.

%% @private
-spec init(poolport_opts:cfg()) -> {ok, state()} | {stop, term()}.
init(Cfg) ->
    process_flag(trap_exit, true),
    %% Every log event of this process names its pool (logger metadata).
    logger:update_process_metadata(#{poolport_pool => case Cfg of
                                                         #{name := undefined} -> self();
                                                         #{name := Name} -> Name
                                                     end}),
    case poolport_os:open(Cfg) of
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
handle_call(info, _From, State) ->
    {reply, info_map(State), State};
handle_call({sys_call, _Function, _Request}, _From, #state{port = undefined} = State) ->
    {reply, {error, port_closed}, State};
handle_call({sys_call, Function, Request}, From, #state{port = Port} = State) ->
    case write(Port, [Request]) of
        ok -> {noreply, enqueue({sys_call, From, Function}, State)};
        error -> {reply, {error, port_closed}, State}
    end;
handle_call({stream, _Request, _Window, _Timeout}, _From, #state{port = undefined} = State) ->
    {reply, {error, port_closed}, count_error(State)};
handle_call({stream, Request, Window, Timeout}, {Pid, _} = From, State0) ->
    #state{cfg = #{packet := Packet}, port = Port} = State0,
    %% The same timeout packet rule as a call's (see frames/3).
    {Frames, State} = frames(Timeout, Request, State0),
    case poolport_wire:check_frame(Request, Packet) =:= ok andalso write(Port, Frames) of
        ok ->
            MRef = erlang:monitor(process, Pid),
            TRef = case Timeout of
                       infinity -> undefined;
                       _ -> erlang:send_after(Timeout, self(), {call_timeout, MRef})
                   end,
            {noreply, enqueue({stream, MRef, Window}, State#state{
                pending = maps:put(MRef, {From, TRef}, State#state.pending)})};
        false ->
            {reply, poolport_wire:check_frame(Request, Packet), count_error(State)};
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
                     case poolport_wire:check_frame(Request, Packet) of
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
handle_cast({workers, N}, State) when is_integer(N), N >= 0 ->
    %% A resize: the count the group's load publication reads at once.
    {noreply, State#state{workers = N}};
handle_cast(_Request, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), state()) -> {noreply, state()} | {stop, term(), state()}.
handle_info({?CALL, Kind, Alias, Pid, Timeout, Request}, State)
  when is_reference(Alias), is_pid(Pid), is_binary(Request) ->
    {noreply, call(Kind, Alias, Pid, Timeout, Request, State)};
handle_info({?GAVE_UP, Alias}, #state{calls_queued = Queued, seq = Seq} = State) when Queued > 0 ->
    {noreply, State#state{gave_up = maps:put(Alias, true, State#state.gave_up),
                          gave_up_at = queue:in({Seq, Alias}, State#state.gave_up_at)}};
handle_info({Port, {data, Data}}, #state{port = Port} = State) ->
    case handle_data(Data, State) of
        {ok, State1} -> {noreply, State1};
        {misaligned, Why} -> misaligned(Why, State)
    end;
handle_info({Port, {exit_status, Status}}, #state{port = Port} = State) ->
    port_down({exit_status, Status}, State);
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    port_down({port_exit, Reason}, State);
%% A stream that did not start in time (plain calls have no timer here).
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
    %% Stale messages of a previous port, the previous port's 'EXIT', a
    %% caller that gave up after its reply went out, ...
    {noreply, State}.

%% @private
-spec terminate(term(), state()) -> ok.
terminate(_Reason, State0) ->
    ok = poolport_events:detach(self(), maps:get(name, State0#state.cfg)),
    State = leave_group(State0),
    cancel_timer(State#state.reopen_timer),
    ok = fail_sys_calls(port_closed, State#state.queue),
    _ = fail_streams(port_closed, fail_pending(State)),
    case State#state.port of
        undefined -> ok;
        Port -> poolport_os:close(Port, State#state.os_pid, maps:get(stop_timeout, State#state.cfg))
    end.

%% @private
-spec code_change(term(), state(), term()) -> {ok, state()}.
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

%% Internal.

%% Options.

%% The port.

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
                    poolport_os:close(Port, OsPid, 0),
                    {stop, {misaligned, Why}}
            end;
        {Port, {exit_status, Status}} ->
            Tail = poolport_os:diagnose(State#state.cfg),
            ?LOG_ERROR("poolport ~p: Python exited with status ~b during start; "
                       "`poolport check --init' with the same options says:~n~ts",
                       [pool_id(State), Status, Tail]),
            {stop, {python_exited, Status, Tail}};
        {'EXIT', Port, Reason} ->
            {stop, {port_exit, Reason}}
    after Timeout ->
        poolport_os:close(Port, OsPid, 0),
        {stop, {start_timeout, Timeout}}
    end.

%% A caller's request: write its frames and queue it, or answer it at once.
-spec call(call | member_call, reference(), pid(), timeout(), binary(), state()) -> state().
call(member_call, Alias, _Pid, _Timeout, _Request, #state{joined = false} = State) ->
    %% Not in its group (Python is restarting): the caller tries another member.
    Alias ! {Alias, {error, not_member}},
    State;
call(_Kind, Alias, _Pid, _Timeout, _Request, #state{port = undefined} = State) ->
    Alias ! {Alias, {error, port_closed}},
    count_error(State#state{calls = State#state.calls + 1});
call(_Kind, Alias, Pid, Timeout, Request,
     #state{port = Port, cfg = #{packet := Packet}, calls = Calls} = State0) ->
    case poolport_wire:check_frame(Request, Packet) of
        {error, _} = Error ->
            Alias ! {Alias, Error},
            count_error(State0#state{calls = Calls + 1});
        ok ->
            {Frames, State} = frames(Timeout, Request, State0),
            case write(Port, Frames) of
                ok ->
                    %% One record update: this runs for every call.
                    #state{queue = Queue, seq = Seq, calls_queued = Queued} = State,
                    State#state{calls = Calls + 1, calls_queued = Queued + 1,
                                queue = queue:in({Seq, {call, Alias, Pid}}, Queue),
                                seq = poolport_wire:next_seq(Seq)};
                error ->
                    %% The port is dying; its exit message follows.
                    Alias ! {Alias, {error, port_closed}},
                    count_error(State#state{calls = Calls + 1})
            end
    end.

%% The frames of a call: its timeout packet, unless Python already applies
%% that timeout to a call without one (`--caller-timeout-ms', the pool's
%% default timeout), then the request. The last packet made is kept, so a
%% run of calls with the same other timeout encodes it once.
-spec frames(timeout(), binary(), state()) -> {[binary()], state()}.
frames(Timeout, Request, #state{cfg = #{caller_timeout := Timeout}} = State)
  when Timeout =:= infinity; Timeout > 0 ->
    {[Request], State};
frames(infinity, Request, #state{cfg = #{caller_timeout := Ms}} = State) when is_integer(Ms), Ms > 0 ->
    {[poolport_wire:encode_timeout(infinity), Request], State};
frames(infinity, Request, State) ->
    {[Request], State};
frames(Timeout, Request, #state{last_packet = {Timeout, Packet}} = State) ->
    {[Packet, Request], State};
frames(Timeout, Request, State) ->
    Packet = poolport_wire:encode_timeout(Timeout),
    {[Packet, Request], State#state{last_packet = {Timeout, Packet}}}.

-spec write(port(), [binary()]) -> ok | error.
write(Port, Frames) ->
    try
        write_all(Port, Frames)
    catch
        error:badarg -> error
    end.

-spec write_all(port(), [binary()]) -> ok.
write_all(Port, [Frame | Rest]) ->
    true = erlang:port_command(Port, Frame),
    write_all(Port, Rest);
write_all(_Port, []) ->
    ok.

%% A freshly opened port: numbering starts again at 0, and the first request
%% is the pool's own '$poolport':info().
-spec attach(port(), non_neg_integer() | undefined, state()) -> state().
attach(Port, OsPid, State) ->
    send_sys_info(State#state{port = Port, os_pid = OsPid, queue = queue:new(), seq = 0}).

-spec send_sys_info(state()) -> state().
send_sys_info(#state{port = Port} = State) ->
    case write(Port, [poolport_wire:encode_call('$poolport', info, [])]) of
        ok -> enqueue(sys_info, State);
        error -> State
    end.

%% Append an entry for a frame just written that Python will answer, with
%% the next request number.
-spec enqueue(entry(), state()) -> state().
enqueue(Entry, #state{queue = Queue, seq = Seq} = State) ->
    State#state{queue = queue:in({Seq, Entry}, Queue), seq = poolport_wire:next_seq(Seq)}.

-spec reopen(state()) -> {noreply, state()} | {stop, term(), state()}.
reopen(#state{cfg = Cfg} = State0) ->
    State = State0#state{restarts = State0#state.restarts + 1},
    case poolport_os:open(Cfg) of
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
-spec misaligned(poolport_wire:misalignment(), state()) -> {noreply, state()} | {stop, term(), state()}.
misaligned(#{why := What, expected := Expected, got := Got} = Why,
           #state{port = Port, os_pid = OsPid} = State) ->
    ?LOG_ERROR("poolport ~p: reply stream misaligned (~p: expected seq ~p, got ~p) with "
               "~b request(s) pending; failing ~b waiting caller(s) with {error, misaligned}, "
               "killing Python (os pid ~p) and reopening the port",
               [pool_id(State), What, Expected, Got, queue:len(State#state.queue),
                waiting(State), OsPid]),
    poolport_os:discard(Port, OsPid),
    restart({misaligned, Why}, misaligned, State#state{misaligned = State#state.misaligned + 1}).

%% Fail the waiting callers with `{error, Error}', forget the port, then
%% reopen it after a backoff, or stop if that happened too often.
-spec restart(term(), port_closed | misaligned, state()) ->
          {noreply, state()} | {stop, term(), state()}.
restart(Why, Error, #state{cfg = Cfg} = State0) ->
    #{max_restarts := MaxRestarts, restart_period := Period} = Cfg,
    ok = fail_sys_calls(Error, State0#state.queue),
    State1 = fail_streams(Error, fail_pending(Error, leave_group(State0))),
    Now = erlang:monotonic_time(millisecond),
    Deaths = recent([Now | State1#state.deaths], Now, Period * 1000),
    State = State1#state{port = undefined, os_pid = undefined, queue = queue:new(), seq = 0,
                         deaths = Deaths, stats = #{}, stats_at = undefined},
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

%% Replies.

%% A reply frame from the port: delivered to the head of the queue if it
%% is the head's, else the misalignment (the state is left as it was).
-spec handle_data(binary(), state()) -> {ok, state()} | {misaligned, poolport_wire:misalignment()}.
handle_data(<<Id:64/big-unsigned, 131, 104, _, Atom, Rest/binary>> = Data, State)
  when Atom =:= 100; Atom =:= 115; Atom =:= 118; Atom =:= 119 ->
    case stream_frame(Atom, Rest) of
        true -> stream_data(Id, Data, State);
        false ->
            case callback_frame(Atom, Rest) of
                true -> callback_data(Data, State);
                false -> reply_data(Data, State)
            end
    end;
handle_data(Data, State) ->
    reply_data(Data, State).

%% A reply frame (the answer to the request at the head of the queue).
-spec reply_data(binary(), state()) -> {ok, state()} | {misaligned, poolport_wire:misalignment()}.
reply_data(<<Seq:64/big-unsigned, _/binary>> = Data, #state{gave_up = GaveUp} = State)
  when map_size(GaveUp) > 0 ->
    case handle_reply(Data, State) of
        {ok, State1} -> {ok, forget_gave_up(Seq, State1)};
        Misaligned -> Misaligned
    end;
reply_data(Data, State) ->
    handle_reply(Data, State).

-spec handle_reply(binary(), state()) -> {ok, state()} | {misaligned, poolport_wire:misalignment()}.
handle_reply(Data, State) ->
    case poolport_wire:match_reply(Data, State#state.queue) of
        {ok, {call, _, _} = Entry, Etf, Queue} ->
            case poolport_wire:is_reply(Etf) of
                true -> {ok, answer(Entry, Etf, Queue, State)};
                false -> decoded(Entry, Etf, Data, Queue, State)
            end;
        {ok, Entry, Etf, Queue} ->
            decoded(Entry, Etf, Data, Queue, State);
        {misaligned, _} = Misaligned ->
            Misaligned
    end.

%% A reply the pool reads itself: one that does not decode means the
%% stream cannot be trusted (it is a misalignment).
-spec decoded(entry(), binary(), binary(), queue:queue({poolport_wire:seq(), entry()}), state()) ->
          {ok, state()} | {misaligned, poolport_wire:misalignment()}.
decoded(Entry, Etf, <<Seq:64/big-unsigned, _/binary>>, Queue, State) ->
    case poolport_wire:decode_reply(Etf) of
        undecodable ->
            {misaligned, #{why => bad_term, expected => Seq, got => Seq}};
        {bad_reply, {stream, Id}} when element(1, Entry) =:= stream, Id =/= Seq ->
            %% A stream's start names its own number: another one is out of step.
            {misaligned, #{why => seq_mismatch, expected => Seq, got => Id}};
        Reply ->
            {ok, deliver(Entry, Reply, Queue, State)}
    end.

%% Request Answered was answered: forget the callers that gave up before
%% any later request was written (theirs is answered, one way or the other).
-spec forget_gave_up(poolport_wire:seq(), state()) -> state().
forget_gave_up(Answered, #state{gave_up_at = At, gave_up = GaveUp} = State) ->
    case queue:peek(At) of
        {value, {Next, Alias}} when Next =< Answered + 1 ->
            forget_gave_up(Answered, State#state{gave_up_at = queue:drop(At),
                                                 gave_up = maps:remove(Alias, GaveUp)});
        _ ->
            State
    end.

%% The reply of a call: `{reply, _}' as its ETF (the caller decodes it),
%% anything else as the caller's result.
-spec answer({call, reference(), pid()}, binary() | {ok, term()} | {error, term()},
             queue:queue({poolport_wire:seq(), entry()}), state()) -> state().
answer({call, Alias, Pid}, Answer, Queue, #state{calls_queued = Queued, gave_up = GaveUp} = State0) ->
    State = State0#state{queue = Queue, calls_queued = Queued - 1},
    case GaveUp of
        #{Alias := true} ->
            %% The caller timed out: count it now, drop the reply.
            count_error(State#state{gave_up = maps:remove(Alias, State#state.gave_up),
                                    timeouts = State#state.timeouts + 1,
                                    dropped = State#state.dropped + 1});
        _ ->
            case node(Pid) =:= node() andalso not erlang:is_process_alive(Pid) of
                true ->
                    State#state{dropped = State#state.dropped + 1};
                false ->
                    Alias ! {Alias, Answer},
                    case Answer of
                        {error, timeout} -> count_error(State#state{timeouts = State#state.timeouts + 1});
                        {error, _} -> count_error(State);
                        _ -> State
                    end
            end
    end.

-spec deliver(entry(), poolport_wire:reply(), queue:queue({poolport_wire:seq(), entry()}), state()) ->
          state().
deliver({call, _, _} = Entry, Reply, Queue, State) ->
    answer(Entry, poolport_wire:call_result(Reply), Queue, State);
deliver(Entry, Reply, Queue, State) ->
    deliver(Entry, Reply, State#state{queue = Queue}).

-spec deliver(cast | sys_info | {sys_call, gen_server:from(), atom()} | {stream, reference(), pos_integer()},
              poolport_wire:reply(), state()) -> state().
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
        {{{From, TRef}, Pending}, _} ->
            %% An error instead of a start (IsStream, NotAStream, WorkerCrashed, ...).
            cancel_timer(TRef),
            erlang:demonitor(MRef, [flush]),
            Result = poolport_wire:call_result(Reply),
            gen_server:reply(From, Result),
            State1 = State#state{pending = Pending},
            case Result of
                {error, timeout} -> count_error(State1#state{timeouts = State1#state.timeouts + 1});
                _ -> count_error(State1)
            end;
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
deliver({sys_call, From, Function}, Reply, State) ->
    gen_server:reply(From, poolport_wire:call_result(Reply)),
    case {Function, Reply} of
        {stats, {reply, #{workers := Workers} = Stats}} when is_integer(Workers) ->
            State#state{stats = Stats, stats_at = erlang:monotonic_time(millisecond),
                        workers = Workers};
        _ ->
            State
    end;
deliver(sys_info, Reply, State) ->
    ?LOG_INFO("poolport ~p: '$poolport':info() answered ~0P", [pool_id(State), Reply, 30]),
    join_group(State).

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
-spec callback_data(binary(), state()) -> {ok, state()} | {misaligned, poolport_wire:misalignment()}.
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
-spec stream_data(poolport_wire:seq(), binary(), state()) -> {ok, state()} | {misaligned, poolport_wire:misalignment()}.
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

%% Reply {error, Error} to every waiting caller (not to those that gave up).
-spec fail_pending(port_closed | misaligned, state()) -> state().
fail_pending(Error, #state{queue = Queue, gave_up = GaveUp, pending = Pending} = State) ->
    Waiting = [Alias || {_, {call, Alias, _}} <- queue:to_list(Queue), not maps:is_key(Alias, GaveUp)],
    _ = [Alias ! {Alias, {error, Error}} || Alias <- Waiting],
    %% Callers waiting for a stream to start.
    maps:foreach(
        fun(MRef, {From, TRef}) ->
            cancel_timer(TRef),
            erlang:demonitor(MRef, [flush]),
            gen_server:reply(From, {error, Error})
        end, Pending),
    State#state{calls_queued = 0, gave_up = #{}, gave_up_at = queue:new(), pending = #{},
                errors = State#state.errors + length(Waiting) + map_size(Pending)}.

%% Reply {error, Error} to the operations still waiting in the queue.
-spec fail_sys_calls(port_closed | misaligned, queue:queue({poolport_wire:seq(), entry()})) -> ok.
fail_sys_calls(Error, Queue) ->
    lists:foreach(fun({_, {sys_call, From, _}}) -> gen_server:reply(From, {error, Error});
                     (_) -> ok
                  end, queue:to_list(Queue)).

-spec count_error(state()) -> state().
count_error(State) ->
    State#state{errors = State#state.errors + 1}.

-spec cancel_timer(reference() | undefined) -> ok.
cancel_timer(undefined) ->
    ok;
cancel_timer(TRef) ->
    _ = erlang:cancel_timer(TRef, [{async, true}, {info, false}]),
    ok.

%% Callers waiting for a reply (a caller that died counts until its reply
%% comes back).
-spec waiting(state()) -> non_neg_integer().
waiting(#state{calls_queued = Queued, gave_up = GaveUp}) ->
    max(0, Queued - map_size(GaveUp)).

-spec info_map(state()) -> map().
info_map(#state{cfg = Cfg} = State) ->
    #{workers => State#state.workers,
      in_flight => queue:len(State#state.queue),
      waiting => waiting(State),
      calls => State#state.calls,
      casts => State#state.casts,
      errors => State#state.errors,
      timeouts => State#state.timeouts,
      dropped => State#state.dropped,
      restarts => State#state.restarts,
      misaligned => State#state.misaligned,
      os_pid => State#state.os_pid,
      status => case State#state.port of undefined -> restarting; _ -> running end,
      packet => maps:get(packet, Cfg),
      python => maps:get(python, Cfg),
      config => maps:get(config, Cfg),
      group => maps:get(group, Cfg),
      streams => map_size(State#state.streams),
      server => State#state.server,
      functions => maps:get(functions, State#state.stats, #{}),
      queue_depth => maps:get(queue_depth, State#state.stats, 0),
      queue_wait => maps:get(queue_wait, State#state.stats, #{p50_us => 0, p99_us => 0, max_us => 0}),
      worker_restarts => maps:get(worker_restarts, State#state.stats,
                                  #{crash => 0, timeout => 0, memory => 0, reload => 0}),
      reloads => maps:get(reloads, State#state.stats, 0),
      stats_age_ms => case State#state.stats_at of
                          undefined -> undefined;
                          At -> erlang:monotonic_time(millisecond) - At
                      end}.

-spec pool_id(state()) -> atom() | pid().
pool_id(#state{cfg = #{name := undefined}}) -> self();
pool_id(#state{cfg = #{name := Name}}) -> Name.


-ifdef(TEST).
-include_lib("eunit/include/eunit.hrl").

%% Callers that gave up and that the pool still remembers (for the tests).
gave_up_count(Pool) ->
    map_size((sys:get_state(Pool))#state.gave_up).

cfg(Opts) ->
    {ok, Cfg} = poolport_opts:check_opts(Opts),
    Cfg.

%% A tagged reply frame: Seq, then the ETF of Term.
tagged(Seq, Term) ->
    <<Seq:64/big-unsigned, (term_to_binary(Term))/binary>>.

backoff_test_() ->
    [?_assertEqual(100, backoff(1)),
     ?_assertEqual(200, backoff(2)),
     ?_assertEqual(3200, backoff(6)),
     ?_assertEqual(5000, backoff(7)),
     ?_assertEqual(5000, backoff(1000))].

recent_test() ->
    ?assertEqual([1000, 900], recent([1000, 900, 100, 0], 1000, 500)).

%% FIFO matching with a fake state: replies go to the head entry (a
%% `{reply, _}' undecoded, an error decoded), late replies of callers that
%% gave up or died are dropped, casts and sys_info consume their own reply;
%% a reply with no request pending is a misalignment.
fifo_test() ->
    A1 = alias(), A2 = alias(), A3 = alias(),
    Dead = spawn(fun() -> ok end),
    MRef = monitor(process, Dead),
    receive {'DOWN', MRef, process, Dead, _} -> ok end,
    State0 = #state{cfg = cfg(#{}),
                    queue = queue:from_list([{0, sys_info}, {1, {call, A1, self()}}, {2, cast},
                                             {3, {call, A2, self()}}, {4, {call, A3, Dead}},
                                             {5, {call, A1, self()}}]),
                    seq = 6, calls_queued = 4, gave_up = #{A1 => true}},
    ?assertEqual(3, waiting(State0)),
    {ok, S1} = handle_data(tagged(0, {reply, #{workers => 3}}), State0),
    ?assertEqual(3, S1#state.workers),
    {ok, S2} = handle_data(tagged(1, {reply, late}), S1),  % A1 gave up
    ?assertMatch(#state{dropped = 1, timeouts = 1, errors = 1}, S2),
    {ok, S3} = handle_data(tagged(2, {noreply}), S2),
    ?assertEqual(1, S3#state.errors),
    {ok, S4} = handle_data(tagged(3, {reply, [x]}), S3),
    ?assertEqual(term_to_binary({reply, [x]}), receive {A2, R2} -> R2 after 0 -> none end),
    {ok, S5} = handle_data(tagged(4, {reply, dead}), S4),  % its caller died
    ?assertMatch(#state{dropped = 2, calls_queued = 1}, S5),
    {ok, S6} = handle_data(tagged(5, {error, {user, 0, <<"E">>, <<>>, []}}), S5),
    ?assertEqual({error, {user, 0, <<"E">>, <<>>, []}}, receive {A1, R1} -> R1 after 0 -> none end),
    ?assertMatch(#state{errors = 2, calls_queued = 0, gave_up = #{}}, S6),
    ?assert(queue:is_empty(S6#state.queue)),
    ?assertEqual(0, waiting(S6)),
    [unalias(A) || A <- [A1, A2, A3]],
    ?assertEqual({misaligned, #{why => empty_queue, expected => none, got => 6}},
                 handle_data(tagged(6, {reply, stray}), S6)).

%% A caller that gave up after its reply went out (a race) is forgotten once
%% a request written after the pool heard of it is answered: timeouts under
%% a load that never lets the queue drain do not make the pool grow.
late_gave_up_is_forgotten_test() ->
    [A1, A2, A3] = As = [alias(), alias(), alias()],
    S0 = #state{cfg = cfg(#{}), seq = 3, calls_queued = 3,
                queue = queue:from_list([{0, {call, A1, self()}}, {1, {call, A2, self()}},
                                         {2, {call, A3, self()}}])},
    {ok, S1} = handle_data(tagged(0, {reply, 1}), S0),
    {noreply, S2} = handle_info({'$poolport_gave_up', A1}, S1),  % too late: already answered
    ?assertEqual(#{A1 => true}, S2#state.gave_up),
    {ok, S3} = handle_data(tagged(1, {reply, 2}), S2),
    ?assertEqual(#{A1 => true}, S3#state.gave_up),  % kept until every older request is answered
    {ok, S4} = handle_data(tagged(2, {reply, 3}), S3),
    ?assertMatch(#state{gave_up = #{}, calls_queued = 0, dropped = 0}, S4),
    ?assert(queue:is_empty(S4#state.gave_up_at)),
    flush_replies(),
    [unalias(A) || A <- As].

%% A reply the pool decodes itself (an error, a cast's, sys_info's) that is
%% no term is a misalignment; a `{reply, _}' head goes to its caller, who
%% finds out.
bad_term_test() ->
    A = alias(),
    Q = queue:from_list([{7, {call, A, self()}}]),
    State = #state{cfg = cfg(#{}), queue = Q, seq = 8, calls_queued = 1},
    ?assertEqual({misaligned, #{why => bad_term, expected => 7, got => 7}},
                 handle_data(<<7:64, 1, 2, 3>>, State)),
    ?assertEqual({misaligned, #{why => bad_term, expected => 7, got => 7}},
                 handle_data(<<7:64>>, State#state{queue = queue:from_list([{7, cast}])})),
    Garbled = <<131, 104, 2, 100, 0, 5, "reply", 255>>,
    {ok, _} = handle_data(<<7:64, Garbled/binary>>, State),
    ?assertMatch({error, {protocol, 0, <<"UnexpectedReply">>, _, []}},
                 receive {A, Etf} -> poolport_wire:read_result(Etf) after 0 -> none end),
    unalias(A).

%% A reply with another caller's number reaches nobody: it is not delivered
%% to the head, and the head's caller is not answered by handle_data/2.
mismatch_delivers_nothing_test() ->
    A = alias(),
    State = #state{cfg = cfg(#{}), queue = queue:from_list([{5, {call, A, self()}}]), seq = 6,
                   calls_queued = 1},
    ?assertMatch({misaligned, #{why := seq_mismatch, expected := 5, got := 6}},
                 handle_data(tagged(6, {reply, not_yours}), State)),
    receive {A, R} -> ?assertEqual(no_reply_expected, R) after 0 -> ok end,
    unalias(A).

%% Numbering of written frames: sys_info, calls and casts count, the
%% {info, timeout, _} frame before a call does not; a reopened port starts
%% at 0 again.
numbering_test() ->
    Port = open_port({spawn_executable, "/bin/cat"}, [{packet, 4}, binary, exit_status]),
    try
        {os_pid, OsPid} = erlang:port_info(Port, os_pid),
        S0 = attach(Port, OsPid, #state{cfg = cfg(#{}), seq = 41}),
        Req = poolport_wire:encode_call(m, f, []),
        S1 = call(call, alias(), self(), infinity, Req, S0),
        {noreply, S2} = handle_cast({cast, poolport_wire:encode_cast(m, f, [])}, S1),
        S3 = call(call, alias(), self(), 100, Req, S2),
        ?assertMatch([{0, sys_info}, {1, {call, _, _}}, {2, cast}, {3, {call, _, _}}],
                     queue:to_list(S3#state.queue)),
        ?assertEqual(4, S3#state.seq),
        ?assertEqual(2, waiting(S3)),
        %% What Python received: 5 frames, the 4th an info packet.
        Frames = [receive {Port, {data, F}} -> binary_to_term(F) after 5000 -> timeout end
                  || _ <- lists:seq(1, 5)],
        ?assertMatch([{call, '$poolport', info, []}, {call, m, f, []}, {cast, m, f, []},
                      {info, timeout, [{ms, 100}]}, {call, m, f, []}], Frames),
        S4 = attach(Port, OsPid, fail_pending(S3)),
        ?assertEqual([{0, sys_info}], queue:to_list(S4#state.queue)),
        ?assertEqual(0, waiting(S4))
    after
        catch port_close(Port)
    end,
    flush_replies().

%% A misaligned reply: every waiting caller gets {error, misaligned} (the
%% one at the head too), the port is closed, the OS process killed, the
%% counter and the reopen timer set.
misaligned_test() ->
    process_flag(trap_exit, true),
    Port = open_port({spawn_executable, "/bin/sh"},
                     [{args, ["-c", "trap '' TERM; exec sleep 60"]}, {packet, 4}, binary,
                      exit_status]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    Aliases = [alias(), alias()],
    State = #state{cfg = cfg(#{}), port = Port, os_pid = OsPid,
                   queue = queue:from_list([{N, {call, A, self()}}
                                            || {N, A} <- lists:zip([0, 1], Aliases)] ++ [{2, cast}]),
                   seq = 3, calls_queued = 2},
    %% The reply to request 1 while request 0 is at the head.
    {noreply, S} = handle_info({Port, {data, tagged(1, {reply, not_yours})}}, State),
    [receive {A, R} -> ?assertEqual({error, misaligned}, R) after 0 -> ?assert(false) end
     || A <- Aliases],
    ?assertMatch(#{misaligned := 1, waiting := 0, in_flight := 0, status := restarting,
                   errors := 2, restarts := 0}, info_map(S)),
    ?assertEqual(0, S#state.seq),
    ?assertEqual(undefined, erlang:port_info(Port)),
    ?assert(is_reference(S#state.reopen_timer)),
    %% SIGTERM is ignored: the helper goes on to SIGKILL.
    ?assert(poolport_os:wait_exit(OsPid, 10000)),
    _ = erlang:cancel_timer(S#state.reopen_timer),
    receive reopen -> ok after 0 -> ok end,
    receive {'EXIT', Port, _} -> ok after 0 -> ok end,
    [unalias(A) || A <- Aliases],
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
    ?assert(poolport_os:wait_exit(OsPid, 10000)).

%% Which timeout packet goes before a call: none for the pool's default
%% timeout (Python applies it), ms 0 for infinity when Python has a default,
%% the timeout otherwise (made once for a run of equal timeouts).
frames_test_() ->
    R = <<"req">>,
    With = #state{cfg = (cfg(#{}))#{caller_timeout => 5000}},
    Without = #state{cfg = cfg(#{})},
    Packet = fun(T) -> poolport_wire:encode_timeout(T) end,
    {F3, S3} = frames(300, R, With),
    [?_assertEqual({[R], With}, frames(5000, R, With)),
     ?_assertMatch({[R], _}, frames(infinity, R, Without)),
     ?_assertMatch({[R], _}, frames(infinity, R, #state{cfg = (cfg(#{}))#{caller_timeout => infinity}})),
     ?_assertEqual([Packet(infinity), R], element(1, frames(infinity, R, With))),
     ?_assertEqual([Packet(300), R], F3),
     ?_assertEqual({[Packet(300), R], S3}, frames(300, R, S3)),
     ?_assertEqual([Packet(0), R], element(1, frames(0, R, #state{cfg = (cfg(#{}))#{caller_timeout => 0}}))),
     ?_assertEqual([Packet(5000), R], element(1, frames(5000, R, Without)))].

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

flush_replies() ->
    receive {A, _} when is_reference(A) -> flush_replies() after 0 -> ok end.

%% Waiting callers get the error, those that gave up do not.
fail_pending_test() ->
    A1 = alias(), A2 = alias(),
    Q = queue:from_list([{0, {call, A1, self()}}, {1, cast}, {2, {call, A2, self()}}]),
    S = fail_pending(#state{cfg = cfg(#{}), queue = Q, calls_queued = 2, gave_up = #{A2 => true}}),
    ?assertMatch(#state{calls_queued = 0, gave_up = #{}, errors = 1}, S),
    receive {A1, R} -> ?assertEqual({error, port_closed}, R) after 0 -> ?assert(false) end,
    receive {A2, R2} -> ?assertEqual(not_sent, R2) after 0 -> ok end,
    S2 = fail_pending(misaligned, S#state{queue = queue:from_list([{0, {call, A2, self()}}]),
                                          calls_queued = 1}),
    ?assertEqual(2, S2#state.errors),
    receive {A2, R3} -> ?assertEqual({error, misaligned}, R3) after 0 -> ?assert(false) end,
    [unalias(A) || A <- [A1, A2]].

%% The caller's side against a stand-in pool: the result, a timeout (the
%% pool is told, a late reply is never seen), a pool that is not there.
caller_test_() ->
    Req = poolport_wire:encode_call(m, f, []),
    Echo = fun Loop() ->
               receive
                   {?CALL, _, Alias, _, _, _} -> Alias ! {Alias, term_to_binary({reply, ok})}, Loop();
                   stop -> ok
               end
           end,
    Silent = fun Loop(Parent) ->
                 receive
                     {?CALL, _, _, _, _, _} = Call -> Parent ! {got, Call}, Loop(Parent);
                     {?GAVE_UP, Alias} -> Parent ! {gave_up, Alias}, Alias ! {Alias, late}, Loop(Parent)
                 end
             end,
    [{"a reply", fun() ->
          Pool = spawn(Echo),
          ?assertEqual({ok, ok}, request(Pool, call, Req, 1000)),
          Pool ! stop
      end},
     {"a timeout: the pool is told, the late reply dropped by the runtime", fun() ->
          Self = self(),
          Pool = spawn(fun() -> Silent(Self) end),
          ?assertEqual({error, timeout}, request(Pool, call, Req, 20)),
          Alias = receive {got, {?CALL, call, A, Self, 20, Req}} -> A end,
          receive {gave_up, Alias} -> ok after 1000 -> ?assert(false) end,
          receive {Alias, _} = Stray -> ?assertEqual(none, Stray) after 100 -> ok end,
          exit(Pool, kill)
      end},
     {"infinity is sent as such", fun() ->
          Self = self(),
          Pool = spawn(fun() -> Silent(Self) end),
          Caller = spawn(fun() -> request(Pool, call, Req, infinity) end),
          receive {got, {?CALL, call, _, Caller, infinity, Req}} -> ok after 1000 -> ?assert(false) end,
          exit(Caller, kill), exit(Pool, kill)
      end},
     {"no pool", fun() ->
          Dead = spawn(fun() -> ok end),
          MRef = monitor(process, Dead),
          receive {'DOWN', MRef, _, _, _} -> ok end,
          ?assertEqual({error, noproc}, request(Dead, call, Req, 1000)),
          ?assertEqual({error, noproc}, request(no_such_pool_registered, call, Req, 1000)),
          ?assertEqual({error, noproc}, request({global, no_such_pool}, call, Req, 1000))
      end},
     {"the pool crashes: the caller exits as from gen_server:call", fun() ->
          Pool = spawn(fun() -> receive {?CALL, _, _, _, _, _} -> exit(boom) end end),
          ?assertExit({boom, {?MODULE, call, [Pool]}}, request(Pool, call, Req, 1000))
      end}].

-endif.

