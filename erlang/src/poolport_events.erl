%% @doc Events for metrics systems, without a dependency: the pool option
%% `events => Module' makes poolport call `Module:handle_event(Event,
%% Measurements, Metadata)', the shape of Elixir's `telemetry' library:
%%
%% <ul>
%% <li>`[poolport, call, start]', `#{system_time => T}', before a call is sent;</li>
%% <li>`[poolport, call, stop]', `#{duration => D}' (native time units), after
%%   `{ok, _}';</li>
%% <li>`[poolport, call, exception]', `#{duration => D}', after `{error, _}',
%%   with `kind => error, reason => Reason' in the metadata;</li>
%% <li>`[poolport, python, restart]', `#{restarts => N}', when the pool has
%%   restarted its Python side.</li>
%% </ul>
%%
%% Call metadata is `#{pool => Pool, module => M, function => F}'. Call
%% events run in the calling process (they cost the pool nothing), for calls
%% to a local pool by its name or pid; restart events run in the pool. A
%% handler that raises is logged and detached from that pool, as telemetry
%% does: the call itself is never affected.
-module(poolport_events).

-export([attach/3, detach/2, handler/1, span/5, emit/4]).

-include_lib("kernel/include/logger.hrl").

-type event() :: [atom()].
-export_type([event/0]).

-callback handle_event(event(), map(), map()) -> term().

%% @doc Send the events of the pool `Pid' (registered as `Name', or
%% `undefined') to `Module'. Called by the pool when it starts.
-spec attach(pid(), atom(), module() | undefined) -> ok.
attach(_Pid, _Name, undefined) ->
    ok;
attach(Pid, Name, Module) ->
    Keys = [Pid | [Name || Name =/= undefined]],
    _ = [persistent_term:put(key(K), {Module, Keys}) || K <- Keys],
    ok.

%% @doc Stop sending the pool's events (when it stops).
-spec detach(pid(), atom()) -> ok.
detach(Pid, Name) ->
    forget([Pid | [Name || Name =/= undefined]]).

%% @doc The events module of a local pool, or `undefined'.
-spec handler(term()) -> {module(), [pid() | atom()]} | undefined.
handler(Pool) when is_pid(Pool); is_atom(Pool) ->
    persistent_term:get(key(Pool), undefined);
handler(_) ->
    undefined.

%% @doc Run `Call' (a call to `Pool' of `M':`F') between its start and its
%% stop or exception event.
-spec span({module(), [pid() | atom()]}, term(), atom(), atom(),
           fun(() -> {ok, term()} | {error, term()})) -> {ok, term()} | {error, term()}.
span(Handler, Pool, M, F, Call) ->
    Meta = #{pool => Pool, module => M, function => F},
    Attached = emit(Handler, [poolport, call, start], #{system_time => erlang:system_time()}, Meta),
    Start = erlang:monotonic_time(),
    Result = Call(),
    Duration = #{duration => erlang:monotonic_time() - Start},
    _ = case {Attached, Result} of
            {detached, _} -> ok;
            {ok, {ok, _}} -> emit(Handler, [poolport, call, stop], Duration, Meta);
            {ok, {error, Reason}} ->
                emit(Handler, [poolport, call, exception], Duration,
                     Meta#{kind => error, reason => Reason})
        end,
    Result.

%% @doc Call the handler; one that raises is logged and detached.
-spec emit({module(), [pid() | atom()]}, event(), map(), map()) -> ok | detached.
emit({Module, Keys}, Event, Measurements, Meta) ->
    try
        _ = Module:handle_event(Event, Measurements, Meta),
        ok
    catch
        Class:Reason:Stack ->
            ?LOG_WARNING("poolport: events handler ~p raised ~p:~p on ~p; detached from ~p~n~p",
                         [Module, Class, Reason, Event, Keys, Stack]),
            ok = forget(Keys),
            detached
    end.

%% Erase the keys that are there (an erase costs a global GC pass: none for
%% keys already gone).
-spec forget([pid() | atom()]) -> ok.
forget(Keys) ->
    _ = [persistent_term:erase(key(K)) || K <- Keys,
                                          persistent_term:get(key(K), undefined) =/= undefined],
    ok.

-spec key(pid() | atom()) -> {module(), pid() | atom()}.
key(Pool) ->
    {?MODULE, Pool}.
