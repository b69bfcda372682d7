%% @doc Live operations on a pool: reload the Python code, resize, re-read
%% the configuration.
%%
%% Each is a `'$poolport'' operation that Python's dispatcher answers
%% itself, in its turn in reply order (see {@link poolport_server:sys_call/4}).
%% A reload takes seconds (new worker processes import the handlers and run
%% `worker_init', old ones finish their calls), and an answer that waited for
%% it would hold up every reply behind it. So `'$poolport':reload()' answers
%% a ticket at once, and this module asks `'$poolport':reload_status(Ticket)'
%% every 20 ms until the reload is done or failed, in the caller's process.
%%
%% Use the {@link poolport} module; this one is its implementation.
-module(poolport_ops).

-export([reload/2]).
-export([resize/2]).
-export([reload_config/2]).

%% ms between two questions about a running reload.
-define(POLL, 20).
%% How long a resize waits for its answer (it is answered at once, in
%% reply order).
-define(RESIZE_TIMEOUT, 30000).

-type failure() :: {reload_failed, binary()} | timeout | poolport:reason() | term().
%% Why an operation failed: `{reload_failed, Text}' carries what Python
%% says, the traceback of the import or of `worker_init' included.

-export_type([failure/0]).

%% @doc See {@link poolport:reload/2}.
-spec reload(poolport:pool(), timeout()) -> ok | {error, failure()}.
reload(Pool, Timeout) ->
    Deadline = poolport_server:deadline(Timeout),
    case op(Pool, reload, [], Deadline) of
        {ok, Ticket} when is_integer(Ticket) -> await(Pool, Ticket, Deadline);
        {ok, Other} -> {error, {unexpected_reply, Other}};
        {error, _} = Error -> Error
    end.

%% @doc See {@link poolport:resize/2}.
-spec resize(poolport:pool(), pos_integer()) -> ok | {error, failure()}.
resize(Pool, Workers) ->
    case op(Pool, resize, [Workers], poolport_server:deadline(?RESIZE_TIMEOUT)) of
        {ok, ok} ->
            gen_server:cast(Pool, {workers, Workers}),
            ok;
        {ok, Other} -> {error, {unexpected_reply, Other}};
        {error, _} = Error -> Error
    end.

%% @doc See {@link poolport:reload_config/2}.
-spec reload_config(poolport:pool(), timeout()) ->
          {ok, #{applied := [atom()], needs_restart := [atom()]}} | {error, failure()}.
reload_config(Pool, Timeout) ->
    Deadline = poolport_server:deadline(Timeout),
    case op(Pool, reload_config, [], Deadline) of
        {ok, #{applied := Applied, needs_restart := Restart, reload := Ticket}} ->
            Done = case Ticket of
                       undefined -> ok;
                       _ when is_integer(Ticket) -> await(Pool, Ticket, Deadline)
                   end,
            case Done of
                ok ->
                    %% `workers' may have changed: the pool learns it at once.
                    _ = poolport_server:sys_call(Pool, stats, [], poolport_server:remaining(Deadline)),
                    {ok, #{applied => Applied, needs_restart => Restart}};
                {error, _} = Error ->
                    Error
            end;
        {ok, {error, Text}} -> {error, {config, Text}};
        {ok, Other} -> {error, {unexpected_reply, Other}};
        {error, _} = Error -> Error
    end.

%% Internal.

-spec await(poolport:pool(), integer(), integer() | infinity) -> ok | {error, failure()}.
await(Pool, Ticket, Deadline) ->
    case op(Pool, reload_status, [Ticket], Deadline) of
        {ok, running} ->
            receive after min(?POLL, poolport_server:remaining(Deadline)) -> ok end,
            await(Pool, Ticket, Deadline);
        {ok, ok} -> ok;
        {ok, {error, Text}} -> {error, {reload_failed, Text}};
        {ok, unknown} -> {error, {reload_failed, <<"Python does not know this reload any more "
                                                   "(it restarted meanwhile)">>}};
        {ok, Other} -> {error, {unexpected_reply, Other}};
        {error, _} = Error -> Error
    end.

-spec op(poolport:pool(), atom(), list(), integer() | infinity) -> {ok, term()} | {error, term()}.
op(Pool, Function, Args, Deadline) ->
    case poolport_server:remaining(Deadline) of
        0 -> {error, timeout};
        Left -> poolport_server:sys_call(Pool, Function, Args, Left)
    end.

