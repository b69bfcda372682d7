%% @doc Call Python functions in parallel through one Erlang port.
%%
%% A pool is a {@link poolport_server} process that owns one port to
%% `python -m poolport serve'. Any number of Erlang processes may call
%% through the same pool at once: every request is written to the port as
%% soon as it arrives (pipelining) and the replies, which Python sends back
%% strictly in request order, are matched to the callers by a FIFO queue.
%%
%% ```
%% {ok, Pool} = poolport:start_link(#{config => "config/poolport.yaml",
%%                                    name => my_pool}),
%% {ok, 42} = poolport:call(my_pool, demo, twice, [21]),
%% {error, {user, 0, <<"ValueError">>, _, _}} = poolport:call(my_pool, demo, fail, []),
%% ok = poolport:stop(my_pool).
%% '''
%%
%% Pools on many nodes can stand behind one name: start each with
%% `group => Name' and call `{group, Name}' (see {@link poolport_group}):
%%
%% ```
%% {ok, _} = poolport:start(#{config => "config/poolport.yaml", group => demo}),
%% {ok, 42} = poolport:call({group, demo}, demo, twice, [21]),
%% {ok, _} = poolport:call({group, demo}, demo, burn, [200000], 5000, #{retry => 1}).
%% '''
-module(poolport).

%% API.
-export([start_link/1]).
-export([start/1]).
-export([child_spec/1]).
-export([call/4]).
-export([call/5]).
-export([call/6]).
-export([cast/4]).
-export([stream/4]).
-export([stream/5]).
-export([next/1]).
-export([next/2]).
-export([cancel/1]).
-export([info/1]).
-export([members/1]).
-export([reload/1]).
-export([reload/2]).
-export([resize/2]).
-export([reload_config/1]).
-export([reload_config/2]).
-export([stop/1]).

-type opts() :: #{
    config => file:filename_all() | {priv, atom(), file:filename_all()} | undefined,
    python => file:filename_all(),
    name => atom(),
    packet => 1 | 2 | 4,
    args => [string() | binary()],
    env => [{string() | binary(), string() | binary() | false}],
    cd => file:filename_all(),
    max_restarts => non_neg_integer(),
    restart_period => pos_integer(),
    start_timeout => pos_integer(),
    stop_timeout => non_neg_integer(),
    group => atom(),
    events => module(),
    callbacks => [module() | {module(), atom()}]
}.
%% Pool options; every key is optional.
%% <dl>
%% <dt>`config'</dt><dd>Path of the YAML configuration passed as
%%   `--config'; relative paths are resolved against the current directory
%%   of the Erlang node. `{priv, App, Path}' is `Path' in the priv directory
%%   of the application `App' (`code:priv_dir/1'), for a release that ships
%%   its YAML and handlers there; `{priv, poolport, "demo.yaml"}' serves
%%   `poolport.demo_handlers'. Default `"config/poolport.yaml"'; `undefined'
%%   passes no `--config' at all.</dd>
%% <dt>`python'</dt><dd>Interpreter, a path or a name looked up in `PATH'.
%%   Default: the application environment key `python', else `"python3"'.</dd>
%% <dt>`name'</dt><dd>Register the pool locally under this name.</dd>
%% <dt>`packet'</dt><dd>`{packet, N}' framing, 1, 2 or 4 (default 4); also
%%   passed to Python as `--packet N'.</dd>
%% <dt>`args'</dt><dd>Extra command line arguments appended after
%%   `serve --config C --packet N --reply-tags'.</dd>
%% <dt>`env'</dt><dd>Extra environment variables for the Python process
%%   (`false' as value unsets one).</dd>
%% <dt>`cd'</dt><dd>Working directory of the Python process.</dd>
%% <dt>`max_restarts', `restart_period'</dt><dd>If the Python process dies
%%   more than `max_restarts' times (default 5) within `restart_period'
%%   seconds (default 10) the pool stops and its supervisor takes over.</dd>
%% <dt>`start_timeout'</dt><dd>ms to wait for Python's first answer when
%%   the pool starts (default 15000).</dd>
%% <dt>`stop_timeout'</dt><dd>ms {@link stop/1} waits for the Python process
%%   to exit after closing its stdin, before it sends SIGTERM and then
%%   SIGKILL (to it and its child processes) (default 10000; keep it above
%%   Python's `shutdown_grace_ms', 5000 by default).</dd>
%% <dt>`group'</dt><dd>Join the process group of this name in the `pg'
%%   scope `poolport' while Python is up (not while it restarts, not after
%%   the pool stopped), so that `{group, Name}' calls reach this pool too.
%%   Default: no group.</dd>
%% <dt>`events'</dt><dd>A module whose `handle_event(Event, Measurements,
%%   Metadata)' gets the pool's call and restart events, in the shape of
%%   Elixir's `telemetry' (see {@link poolport_events}). Default none.</dd>
%% <dt>`callbacks'</dt><dd>What Python handlers may call on this node with
%%   `poolport.erlang.call/cast': a module (any of its functions) or
%%   `{Module, Function}'. Each callback runs in a process of its own, killed
%%   after its timeout. Default `[]': every callback is refused.</dd>
%% </dl>

-type pool() :: pid() | atom() | {atom(), node()} | {global, term()}
              | {via, module(), term()}.
%% A pool, as `gen_server' addresses it: its pid, its locally registered
%% name, `{Name, Node}' for a pool registered on another node, or a
%% `{global, Name}' / `{via, Module, Name}' name.

-type target() :: pool() | {group, atom()}.
%% A pool, or `{group, Name}': one of the members of a group, on any
%% connected node (see {@link poolport_group}).

-type call_opts() :: #{retry => non_neg_integer()}.
%% Options of {@link call/6}. `retry': how many times a call to a group
%% member whose node went down while the call was pending is sent again to
%% another member (default 0; only for calls that may safely run twice).

-type absent() :: noproc | {nodedown, node()}.
%% There is no pool to ask: `noproc' if the pid is dead or nobody is
%% registered under the name, `{nodedown, Node}' if the pool's node cannot
%% be reached.

-type error_type() :: protocol | server | user.
-type bert_error() :: {error_type(), integer(), binary(), binary(), [binary()]}.
%% The BERT-RPC error tuple `{Type, Code, Class, Detail, Backtrace}' sent by
%% Python.

-type reason() :: bert_error() | timeout | port_closed | misaligned | absent()
                | no_members.
%% Why a call failed: an error reported by Python, the call's timeout
%% (whichever side noticed it first), the Python process is gone (it
%% died while the call was pending, or it is being restarted), the reply
%% stream from Python got out of step while the call was pending
%% (`misaligned': a reply was lost or duplicated; the pool restarted
%% Python rather than risk giving the caller another call's answer), or
%% there is no pool at all (see {@type absent()}), or (`no_members') a
%% group has no member to call.

-export_type([opts/0]).
-export_type([pool/0]).
-export_type([target/0]).
-export_type([call_opts/0]).
-export_type([error_type/0]).
-export_type([bert_error/0]).
-export_type([reason/0]).
-export_type([absent/0]).
-export_type([stream/0]).
-export_type([stream_opts/0]).

-opaque stream() :: {poolport_stream, pid(), reference()}.
%% A stream started by {@link stream/5}: read it with {@link next/2}, close
%% it with {@link cancel/1}.

-type stream_opts() :: #{window => pos_integer(), timeout => timeout(),
                         idle_timeout => pos_integer()}.
%% Options of {@link stream/5}: `window', the items Python may produce
%% ahead of the consumer (default 64, at most 1048576); `timeout' (ms), for
%% the stream's start and, in Python, for each item (the pool's timeout
%% rules apply per item; default: the `default_timeout' of the
%% application environment, 5000); `idle_timeout' (ms), how long Python
%% waits for the consumer to take an item when the window is full before
%% it closes the stream with `{error, timeout}' (default 60000).

%% API.

%% @doc Start a pool linked to the calling process.
%%
%% Opens the port to Python and waits (at most `start_timeout' ms) for its
%% first answer, so `{ok, Pid}' means Python is up. For use in your own
%% supervision tree, see {@link child_spec/1}. Invalid options, a missing
%% interpreter or a missing config file give `{error, Reason}' without
%% starting anything.
%%
%% A pool with a `group' needs the group scope: the `poolport' application
%% is started if it is not running.
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    case poolport_opts:prepare(Opts) of
        {ok, #{group := undefined} = Cfg} ->
            poolport_server:start_link(Cfg);
        {ok, Cfg} ->
            case application:ensure_all_started(poolport) of
                {ok, _} -> poolport_server:start_link(Cfg);
                {error, _} = Error -> Error
            end;
        {error, _} = Error ->
            Error
    end.

%% @doc Start a pool under the application's supervisor (`poolport_sup').
%%
%% The pool is restarted if it crashes; {@link stop/1} removes it. Starts
%% the `poolport' application if needed.
-spec start(opts()) -> {ok, pid()} | {error, term()}.
start(Opts) ->
    case application:ensure_all_started(poolport) of
        {ok, _} ->
            case poolport_opts:prepare(Opts) of
                {ok, Cfg} -> poolport_sup:start_pool(Cfg);
                {error, _} = Error -> Error
            end;
        {error, _} = Error ->
            Error
    end.

%% @doc A child specification for a pool in your own supervisor.
%%
%% The id is the `name' option if given, else `poolport'. Raises
%% `error({badarg, Reason})' if the options are invalid.
-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(Opts) ->
    case poolport_opts:check_opts(Opts) of
        {ok, Cfg} ->
            #{id => maps:get(name, Opts, poolport),
              start => {poolport, start_link, [Opts]},
              restart => permanent,
              shutdown => poolport_os:shutdown_timeout(Cfg),
              type => worker,
              modules => [poolport, poolport_server]};
        {error, Reason} ->
            erlang:error({badarg, Reason}, [Opts])
    end.

%% @doc Call `Module.Function(*Args)' in Python with the default timeout.
%%
%% The timeout is the application environment key `default_timeout' (ms,
%% default 5000).
-spec call(target(), atom(), atom(), list()) -> {ok, term()} | {error, reason()}.
call(Pool, Module, Function, Args) ->
    call(Pool, Module, Function, Args, default_timeout()).

%% @doc Call `Module.Function(*Args)' in Python, waiting at most `Timeout' ms.
%%
%% `Timeout' is `infinity' or an integer >= 0; anything else raises
%% `badarg' in the caller, before the pool is asked. An integer above
%% 4294967295 (ms, about 49.7 days, the largest timer value) is clamped to
%% 4294967295, which is also the value sent to Python.
%%
%% An integer timeout is also sent to Python, which stops the call when it
%% expires. After `{error, timeout}' no late reply ever reaches the caller's
%% mailbox: the pool drops it.
%%
%% If there is no pool (a dead pid, an unregistered name, a remote node
%% that is down) the result is `{error, noproc}' or
%% `{error, {nodedown, Node}}' instead of an exit of the caller. Only a
%% pool that crashes while the call is pending (which the pool itself never
%% does on purpose: it answers `{error, port_closed}' when it stops)
%% still exits the caller with `gen_server:call/3''s exit reason.
%%
%% A caller only ever gets the answer to its own request: if Python's
%% numbered replies show the stream out of step, every waiting caller gets
%% `{error, misaligned}' and the pool restarts Python.
%%
%% `{group, Name}' calls one member of the group: the least loaded of two
%% drawn at random, or a member on this node with a free worker. A member
%% that is gone before the request is written to it is skipped (another one
%% is called, within the same `Timeout'); if the node of the member goes down
%% while the call is pending the result is `{error, {nodedown, Node}}' (see
%% {@link call/6} to send it again elsewhere). With no member at all:
%% `{error, no_members}' at once.
-spec call(target(), atom(), atom(), list(), timeout()) -> {ok, term()} | {error, reason()}.
call(Pool, Module, Function, Args, Timeout) ->
    call(Pool, Module, Function, Args, Timeout, #{}).

%% @doc {@link call/5} with options: `#{retry => N}' sends a call to a group
%% member whose node went down while the call was pending to another member,
%% up to `N' times (default 0), within the same `Timeout'. Only for calls
%% that may run twice: the first one may have run on the node that went
%% down. A pool that is not a group has nowhere else to go: `retry' is
%% checked but changes nothing. Bad options raise `badarg'.
-spec call(target(), atom(), atom(), list(), timeout(), call_opts()) ->
          {ok, term()} | {error, reason()}.
call(Pool, Module, Function, Args, Timeout, Opts)
  when is_atom(Module), is_atom(Function), is_list(Args),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)),
       is_map(Opts) ->
    case retries(Opts) of
        {ok, Retry} ->
            Request = poolport_wire:encode_call(Module, Function, Args),
            case Pool of
                {group, Group} when is_atom(Group) ->
                    ensure_started(),
                    poolport_group:call(Group, Request, poolport_server:clamp_timeout(Timeout),
                                        Retry);
                _ ->
                    Call = fun() -> poolport_server:call(Pool, Request,
                                                         poolport_server:clamp_timeout(Timeout)) end,
                    case poolport_events:handler(Pool) of
                        undefined -> Call();
                        Handler -> poolport_events:span(Handler, Pool, Module, Function, Call)
                    end
            end;
        error ->
            erlang:error(badarg, [Pool, Module, Function, Args, Timeout, Opts])
    end;
call(Pool, Module, Function, Args, Timeout, Opts) ->
    erlang:error(badarg, [Pool, Module, Function, Args, Timeout, Opts]).

%% @doc Run `Module.Function(*Args)' in Python without waiting for it.
%%
%% Returns at once. Python still runs the function, in request order with
%% the calls; an error it reports is logged and counted in `errors'.
%% Fire and forget: a cast to a pool that does not exist or sits on a node
%% that is down also returns `ok' (the request is lost). `{group, Name}'
%% casts to one member, chosen as for a call (none: the request is lost).
-spec cast(target(), atom(), atom(), list()) -> ok.
cast({group, Group}, Module, Function, Args)
  when is_atom(Group), is_atom(Module), is_atom(Function), is_list(Args) ->
    ensure_started(),
    poolport_group:cast(Group, poolport_wire:encode_cast(Module, Function, Args));
cast(Pool, Module, Function, Args)
  when is_atom(Module), is_atom(Function), is_list(Args) ->
    poolport_server:cast(Pool, poolport_wire:encode_cast(Module, Function, Args));
cast(Pool, Module, Function, Args) ->
    erlang:error(badarg, [Pool, Module, Function, Args]).

%% @doc Counters and state of a pool.
%%
%% Keys: `workers' (Python worker processes, `undefined' until Python told),
%% `in_flight' (requests written to Python and not yet answered), `waiting'
%% (callers waiting for a reply), `calls', `casts', `errors' (calls and
%% casts that ended in an error), `timeouts', `dropped' (late replies
%% thrown away), `restarts' (times the port was reopened), `misaligned'
%% (reply frames that were not the answer to the oldest pending request,
%% each followed by a restart of Python), `os_pid' (of
%% the Python process, `undefined' while restarting), `status' (`running'
%% or `restarting'), `packet', `python', `config' and `server' (the map
%% Python returned for `'$poolport':info()').
%%
%% Like {@link call/5}, returns `{error, noproc}' or
%% `{error, {nodedown, Node}}' if there is no pool, and `{error, timeout}'
%% if the pool did not answer within 5 s (it is stopping, for example).
%%
%% For `{group, Name}': `#{group, members, nodes, workers, in_flight}', where
%% `members' lists `#{pool, node, workers, in_flight, calls, status}' for
%% each member (asked from all at once, 5 s at most; one that did not answer
%% has `status => {error, Reason}'), and `workers' and `in_flight' are sums.
%%
%% Python's statistics, since Python (re)started: `functions' is
%% `#{{Module, Function} => #{calls, errors, timeouts, crashes, p50_us,
%% p99_us, max_us}}' (latency measured in the worker around the handler, in
%% fixed buckets at most 25 % wide: a percentile is its bucket's upper bound),
%% `queue_depth' (requests waiting for a worker), `queue_wait' (`#{p50_us,
%% p99_us, max_us}' from a request's arrival in Python to a worker),
%% `worker_restarts' (`#{crash, timeout, memory, reload}') and `reloads'.
%% Python is asked for them first, for at most 1 s: its answer takes its
%% turn in reply order, behind calls still running. If it does not come in
%% time the latest ones are shown; `stats_age_ms' says how old they are.
-spec info(target()) -> map() | {error, absent() | timeout}.
info({group, Group}) when is_atom(Group) ->
    ensure_started(),
    poolport_group:info(Group);
info(Pool) ->
    poolport_server:info(Pool).

%% @doc The pids of the members of a group, on all connected nodes.
-spec members(atom()) -> [pid()].
members(Group) when is_atom(Group) ->
    ensure_started(),
    poolport_group:members(Group).

%% @doc {@link reload/2} with a timeout of 5 minutes.
-spec reload(pool()) -> ok | {error, poolport_ops:failure()}.
reload(Pool) ->
    reload(Pool, 300000).

%% @doc Reload the Python code of a running pool without failing a call.
%%
%% A new process first imports the handler modules and runs `worker_init';
%% if that fails, nothing else changes and the result is
%% `{error, {reload_failed, Text}}', `Text' holding the Python traceback.
%% Then the workers are replaced one at a time: a new worker starts (and
%% imports the code afresh), then an old one gets no new calls and ends once
%% it has answered those it has. Calls keep flowing all along. `ok' means
%% every call sent from then on runs the new code. Waits at most `Timeout'
%% ms (`{error, timeout}'; the reload itself goes on). `SIGHUP' to
%% `poolport serve' and `reload: {watch: true}' in the YAML do the same.
-spec reload(pool(), timeout()) -> ok | {error, poolport_ops:failure()}.
reload(Pool, Timeout)
  when Timeout =:= infinity; is_integer(Timeout), Timeout >= 0 ->
    poolport_ops:reload(Pool, Timeout);
reload(Pool, Timeout) ->
    erlang:error(badarg, [Pool, Timeout]).

%% @doc Change the number of Python workers of a running pool.
%%
%% Growing starts the new workers at once; shrinking gives the workers that
%% go no new calls and lets them finish those they have. {@link info/1}
%% shows the new count at once. `N' from 1 to 1024.
-spec resize(pool(), pos_integer()) -> ok | {error, poolport_ops:failure()}.
resize(Pool, N) when is_integer(N), N >= 1, N =< 1024 ->
    poolport_ops:resize(Pool, N);
resize(Pool, N) ->
    erlang:error(badarg, [Pool, N]).

%% @doc {@link reload_config/2} with a timeout of 5 minutes.
-spec reload_config(pool()) ->
          {ok, #{applied := [atom()], needs_restart := [atom()]}} | {error, poolport_ops:failure()}.
reload_config(Pool) ->
    reload_config(Pool, 300000).

%% @doc Read the pool's YAML again and apply what can change live.
%%
%% `applied' lists the keys that changed and now apply: `workers' (a
%% {@link resize/2}), the timeouts, the limits, `log_level' and `reload';
%% when one that workers read at start changed (timeouts, term limits,
%% `log_level', ...) the workers are reloaded as by {@link reload/2}, and
%% this returns once they are. `needs_restart' lists the keys that changed
%% but take a restart of the pool (`modules', `packet', `worker_init', ...).
%% A file that does not validate changes nothing: `{error, {config, Text}}'.
-spec reload_config(pool(), timeout()) ->
          {ok, #{applied := [atom()], needs_restart := [atom()]}} | {error, poolport_ops:failure()}.
reload_config(Pool, Timeout)
  when Timeout =:= infinity; is_integer(Timeout), Timeout >= 0 ->
    poolport_ops:reload_config(Pool, Timeout);
reload_config(Pool, Timeout) ->
    erlang:error(badarg, [Pool, Timeout]).

%% @doc Stop a pool: close the port and wait until the Python process exited.
%%
%% Pending callers get `{error, port_closed}'. If Python does not exit within
%% `stop_timeout' ms it is sent SIGTERM, then SIGKILL.
-spec stop(pool()) -> ok.
stop(Pool) ->
    ok = gen_server:stop(Pool, normal, infinity),
    %% A pool of poolport_sup leaves a stopped child specification behind.
    poolport_sup:purge().

%% @doc {@link stream/5} with default options.
-spec stream(pool(), atom(), atom(), list()) -> {ok, stream()} | {error, reason()}.
stream(Pool, Module, Function, Args) ->
    stream(Pool, Module, Function, Args, #{}).

%% @doc Call `Module.Function(*Args)' in Python as a stream: the function
%% returns an iterator (a generator function does) whose items are read
%% with {@link next/2}.
%%
%% `{ok, Stream}' once the function has returned its iterator; the process
%% that called `stream/5' is the stream's consumer: if it dies, the stream
%% is cancelled. An open stream occupies one worker of the pool until it
%% ends; while it waits for its consumer, the worker runs nothing else.
%% Errors before the stream starts are those of {@link call/5};
%% `{error, {server, 6, <<"NotAStream">>, _, _}}' if the function's result
%% is not iterable. Not for `{group, Name}' (`badarg').
-spec stream(pool(), atom(), atom(), list(), stream_opts()) ->
          {ok, stream()} | {error, reason()}.
stream({group, _} = Group, Module, Function, Args, Opts) ->
    erlang:error(badarg, [Group, Module, Function, Args, Opts]);
stream(Pool, Module, Function, Args, Opts)
  when is_atom(Module), is_atom(Function), is_list(Args), is_map(Opts) ->
    case stream_options(Opts) of
        {ok, Window, Timeout, Idle} ->
            Request = term_to_binary({stream, Module, Function, Args,
                                      [{window, Window}, {idle_ms, Idle}]}),
            poolport_server:stream(Pool, Request, Window, Timeout);
        error ->
            erlang:error(badarg, [Pool, Module, Function, Args, Opts])
    end.

%% @doc {@link next/2} with the default timeout (`default_timeout', 5000).
-spec next(stream()) -> {ok, term()} | done | {error, term()}.
next(Stream) ->
    next(Stream, default_timeout()).

%% @doc The stream's next item: `{ok, Item}', `done' after the last one,
%% or `{error, Reason}': the handler raised (`{user, 0, Class, Detail,
%% Backtrace}'), its worker died (`{server, 4, <<"WorkerCrashed">>, _, _}'),
%% an item took longer than the stream's `timeout' or the consumer took none
%% for `idle_timeout' (`timeout'), Python restarted (`port_closed'). After
%% `done' or an error the stream is closed: a further `next' gives
%% `{error, no_stream}'.
%%
%% `{error, timeout}' when no item came within `Timeout' ms: the stream
%% stays open, ask again. One `next' at a time per stream (`{error, busy}').
-spec next(stream(), timeout()) -> {ok, term()} | done | {error, term()}.
next({poolport_stream, Pool, Ref}, Timeout) ->
    poolport_server:next(Pool, Ref, Timeout).

%% @doc Close a stream: Python closes the generator (its `finally' blocks
%% run) and the items it had sent are dropped. Always `ok', also for a
%% stream that has ended.
-spec cancel(stream()) -> ok.
cancel({poolport_stream, Pool, Ref}) ->
    poolport_server:cancel(Pool, Ref).

%% Internal.

-spec stream_options(map()) -> {ok, pos_integer(), timeout(), pos_integer()} | error.
stream_options(Opts) ->
    Window = maps:get(window, Opts, 64),
    Timeout = maps:get(timeout, Opts, default_timeout()),
    Idle = maps:get(idle_timeout, Opts, 60000),
    Known = maps:size(maps:without([window, timeout, idle_timeout], Opts)) =:= 0,
    case Known andalso is_integer(Window) andalso Window >= 1 andalso Window =< 1048576
        andalso (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0))
        andalso is_integer(Idle) andalso Idle >= 1 andalso Idle =< 4294967295 of
        true -> {ok, Window, Timeout, Idle};
        false -> error
    end.

-spec retries(map()) -> {ok, non_neg_integer()} | error.
retries(Opts) ->
    case maps:to_list(Opts) of
        [] -> {ok, 0};
        [{retry, N}] when is_integer(N), N >= 0 -> {ok, N};
        _ -> error
    end.

%% Groups need the `pg' scope and the load publisher of the application,
%% also on a node that only calls.
-spec ensure_started() -> ok.
ensure_started() ->
    case whereis(poolport_group) of
        undefined -> _ = application:ensure_all_started(poolport), ok;
        _ -> ok
    end.

-spec default_timeout() -> timeout().
default_timeout() ->
    poolport_opts:default_timeout().
