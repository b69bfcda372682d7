%% @doc One stream's state in its pool: the items it buffers, the credit it
%% owes Python, the consumer waiting in {@link poolport:next/2}. Pure: the
%% pool server ({@link poolport_server}) applies what these functions return.
%%
%% ```
%%  Python ──{stream_item, Id, X}──▶ pool ──buffer (at most Window)──▶ next/2
%%         ◀─{stream_credit, Id, N}── pool ◀── N items taken ──────────┘
%% '''
%%
%% Python sends at most `Window' items beyond those the consumer has taken:
%% the pool hands credit back once half a window has been taken, so the
%% buffer here never holds more than `Window' items and a fast generator
%% never floods the pool or the consumer. A stream ends with one last frame
%% from Python (`stream_end' or `stream_error'); the consumer gets it once
%% it has taken every item before it.
-module(poolport_stream).

-export([new/2]).
-export([event/2]).
-export([next/2]).
-export([timed_out/1]).
-export([fail/2]).
-export([id/1]).

-export_type([stream/0, event/0, result/0]).

-type id() :: non_neg_integer().
-type waiter() :: {gen_server:from(), reference() | undefined}.
-type result() :: {ok, term()} | done | {error, term()}.
%% What {@link poolport:next/2} returns.
-type event() :: {item, term()} | done | {error, term()}.
%% A frame of the stream, decoded.

-opaque stream() :: #{id := id(),
                      window := pos_integer(),
                      buf := queue:queue(term()),
                      taken := non_neg_integer(),
                      last := undefined | done | {error, term()},
                      waiter := waiter() | undefined}.

-type effects() :: #{reply => {waiter(), result()}, credit => pos_integer(), finished => boolean()}.
%% What the server must do: answer a waiting consumer (and cancel its
%% timer), send credit to Python, forget the stream (its last result was
%% handed over).

%% @doc A stream just started: Python may send `Window' items.
-spec new(id(), pos_integer()) -> stream().
new(Id, Window) ->
    #{id => Id, window => Window, buf => queue:new(), taken => 0, last => undefined,
      waiter => undefined}.

%% @doc The stream's number on the current port (its request's).
-spec id(stream()) -> id().
id(#{id := Id}) ->
    Id.

%% @doc A frame from Python.
-spec event(event(), stream()) -> {effects(), stream()}.
event(_Event, #{last := Last} = S) when Last =/= undefined ->
    {#{}, S};  % after the port went down: nothing more counts
event({item, Item}, #{waiter := undefined, buf := Buf} = S) ->
    {#{}, S#{buf := queue:in(Item, Buf)}};
event({item, Item}, #{waiter := Waiter} = S) ->
    taken(#{reply => {Waiter, {ok, Item}}}, S#{waiter := undefined});
event(Last, #{waiter := undefined} = S) ->
    {#{}, S#{last := Last}};
event(Last, #{waiter := Waiter} = S) ->
    %% A consumer waits only when nothing is buffered.
    {#{reply => {Waiter, result(Last)}, finished => true}, S#{last := Last, waiter := undefined}}.

%% @doc The consumer asks for the next item: the answer now, or `wait'
%% (the server keeps `From' and its timer as the waiter).
-spec next(waiter(), stream()) -> {effects(), stream()} | {wait, stream()}
                                  | {busy, stream()}.
next(_Waiter, #{waiter := {_, _}} = S) ->
    {busy, S};
next(Waiter, #{buf := Buf, last := Last} = S) ->
    case queue:out(Buf) of
        {{value, Item}, Rest} ->
            taken(#{reply => {Waiter, {ok, Item}}}, S#{buf := Rest});
        {empty, _} when Last =:= undefined ->
            {wait, S#{waiter := Waiter}};
        {empty, _} ->
            {#{reply => {Waiter, result(Last)}, finished => true}, S}
    end.

%% @doc The waiting consumer's timer fired: it gets `{error, timeout}'; the
%% stream stays open.
-spec timed_out(stream()) -> {effects(), stream()}.
timed_out(#{waiter := undefined} = S) ->
    {#{}, S};
timed_out(#{waiter := {From, _}} = S) ->
    {#{reply => {{From, undefined}, {error, timeout}}}, S#{waiter := undefined}}.

%% @doc The port went down (or its replies were misaligned): the stream
%% ends with `{error, Reason}' after the items already buffered.
-spec fail(term(), stream()) -> {effects(), stream()}.
fail(Reason, #{last := undefined} = S) ->
    event({error, Reason}, S);
fail(_Reason, S) ->
    {#{}, S}.

-spec taken(effects(), stream()) -> {effects(), stream()}.
taken(Effects, #{taken := Taken0, window := Window} = S) ->
    Taken = Taken0 + 1,
    case Taken >= max(1, Window div 2) of
        true -> {Effects#{credit => Taken}, S#{taken := 0}};
        false -> {Effects, S#{taken := Taken}}
    end.

-spec result(done | {error, term()}) -> result().
result(done) -> done;
result({error, {server, 3, _Class, _Detail, _Trace}}) -> {error, timeout};
result({error, _} = Error) -> Error.

-ifdef(TEST).
-include_lib("eunit/include/eunit.hrl").

w() -> {{self(), make_ref()}, undefined}.

buffered_items_then_the_end_test() ->
    S0 = new(7, 4),
    {#{}, S1} = event({item, a}, S0),
    {#{}, S2} = event({item, b}, S1),
    {#{}, S3} = event(done, S2),
    W = w(),
    {#{reply := {W, {ok, a}}} = E1, S4} = next(W, S3),
    ?assertNot(maps:is_key(credit, E1)),
    {#{reply := {W, {ok, b}}, credit := 2}, S5} = next(W, S4),
    ?assertMatch({#{reply := {W, done}, finished := true}, _}, next(W, S5)).

a_waiting_consumer_gets_the_item_at_once_test() ->
    W = w(),
    {wait, S1} = next(W, new(1, 1)),
    ?assertEqual(busy, element(1, next(w(), S1))),
    {#{reply := {W, {ok, x}}, credit := 1}, S2} = event({item, x}, S1),
    {wait, S3} = next(W, S2),
    ?assertMatch({#{reply := {W, {error, {user, 0, <<"E">>, <<>>, []}}}, finished := true}, _},
                 event({error, {user, 0, <<"E">>, <<>>, []}}, S3)).

credit_comes_back_every_half_window_test() ->
    W = w(),
    S0 = lists:foldl(fun(I, S) -> element(2, event({item, I}, S)) end, new(1, 64),
                     lists:seq(1, 64)),
    {Credits, _} = lists:mapfoldl(fun(_, S) -> {E, S1} = next(W, S), {maps:get(credit, E, 0), S1} end,
                                  S0, lists:seq(1, 64)),
    ?assertEqual([32, 32], [C || C <- Credits, C > 0]).

timeout_and_failure_test() ->
    W = w(),
    {wait, S1} = next(W, new(1, 8)),
    {#{reply := {_, {error, timeout}}}, S2} = timed_out(S1),
    {#{}, S3} = event({item, 1}, S2),
    {#{}, S4} = fail(port_closed, S3),
    {#{reply := {_, {ok, 1}}}, S5} = next(W, S4),
    ?assertMatch({#{reply := {_, {error, port_closed}}, finished := true}, _}, next(W, S5)),
    %% Python's Timeout (an item or the idle limit) is {error, timeout}.
    ?assertMatch({#{reply := {_, {error, timeout}}}, _},
                 next(W, element(2, event({error, {server, 3, <<"Timeout">>, <<>>, []}}, new(1, 1))))).
-endif.
