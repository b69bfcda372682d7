%% @doc The pool process: owns the port to `python -m poolport serve'.
%%
%% ```
%%  callers ──call/cast──▶ poolport_server ──frames──▶ port ──▶ Python
%%     ▲                     │  FIFO of entries              │
%%     └──gen_server:reply───┘◀──────── replies in order ────┘
%% '''
%%
%% Callers encode their request themselves ({@link poolport_wire:encode_call/3}); the
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
-export([clamp_timeout/1]).

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

-type entry() :: {call, reference()} | cast | sys_info.
-type waiter() :: {gen_server:from(), reference() | undefined}.

-record(state, {
    cfg :: poolport_opts:cfg(),
    port :: port() | undefined,
    os_pid :: non_neg_integer() | undefined,
    %% Requests written to the port and not answered yet, oldest first,
    %% each with its number.
    queue = queue:new() :: queue:queue({poolport_wire:seq(), entry()}),
    %% Number of the next request written to the current port.
    seq = 0 :: poolport_wire:seq(),
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
    joined = false :: boolean()
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
                 _ -> [poolport_wire:encode_timeout(Timeout), Request]
             end,
    case poolport_wire:check_frame(Request, Packet) of
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
terminate(_Reason, State0) ->
    ok = poolport_events:detach(self(), maps:get(name, State0#state.cfg)),
    State = leave_group(State0),
    cancel_timer(State#state.reopen_timer),
    _ = fail_pending(State),
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

-spec write(port(), [binary()]) -> ok | error.
write(Port, Frames) ->
    try
        lists:foreach(fun(Frame) -> true = erlang:port_command(Port, Frame) end, Frames)
    catch
        error:badarg -> error
    end.

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
                map_size(State#state.pending), OsPid]),
    poolport_os:discard(Port, OsPid),
    restart({misaligned, Why}, misaligned, State#state{misaligned = State#state.misaligned + 1}).

%% Fail the waiting callers with `{error, Error}', forget the port, then
%% reopen it after a backoff, or stop if that happened too often.
-spec restart(term(), port_closed | misaligned, state()) ->
          {noreply, state()} | {stop, term(), state()}.
restart(Why, Error, #state{cfg = Cfg} = State0) ->
    #{max_restarts := MaxRestarts, restart_period := Period} = Cfg,
    State1 = fail_pending(Error, leave_group(State0)),
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

%% Replies.

%% A reply frame from the port: delivered to the head of the queue if it
%% is the head's, else the misalignment (the state is left as it was).
-spec handle_data(binary(), state()) -> {ok, state()} | {misaligned, poolport_wire:misalignment()}.
handle_data(Data, State) ->
    case poolport_wire:match_reply(Data, State#state.queue) of
        {ok, Entry, Reply, Queue} -> {ok, deliver(Entry, Reply, State#state{queue = Queue})};
        {misaligned, _} = Misaligned -> Misaligned
    end.

-spec deliver(entry(), poolport_wire:reply(), state()) -> state().
deliver({call, MRef}, Reply, State) ->
    case maps:take(MRef, State#state.pending) of
        {{From, TRef}, Pending} ->
            cancel_timer(TRef),
            erlang:demonitor(MRef, [flush]),
            Result = poolport_wire:call_result(Reply),
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
        Req = poolport_wire:encode_call(m, f, []),
        {noreply, S1} = handle_call({call, Req, infinity}, {self(), make_ref()}, S0),
        {noreply, S2} = handle_cast({cast, poolport_wire:encode_cast(m, f, [])}, S1),
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
    ?assert(poolport_os:wait_exit(OsPid, 10000)),
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
    ?assert(poolport_os:wait_exit(OsPid, 10000)).

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

