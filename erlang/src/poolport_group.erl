%% @doc Groups: pools on many nodes behind one name.
%%
%% A pool started with the option `group => Group' joins the process group
%% `Group' of the `pg' scope `poolport' (started by the application, see
%% {@link poolport_sup}) once its Python side answers, leaves it while Python
%% is restarting and when the pool stops. `poolport:call({group, Group}, M, F,
%% A)' then calls one of the members, on whichever node:
%%
%% <ul>
%% <li><b>Choice.</b> A member's load is its requests in flight over its
%%   workers. The figures come from two places that cost no round trip per
%%   call: what the member's node publishes (every node's `poolport_group'
%%   process sends the `in_flight' and `workers' of its local members to the
%%   same process on every other node, every 100 ms by default, app env
%%   `load_interval') and the calls this node has outstanding at each member
%%   (a row per call in an ETS table, removed when the call returns, or by
%%   the publisher if the caller died during the call); the larger of the two
%%   counts. A caller on a node with a member that has a free worker takes
%%   it; otherwise two members drawn at random are compared and the lighter
%%   one is called ("power of two choices", {@link choose/3}).</li>
%% <li><b>Failover.</b> A member that is gone before the request was written
%%   to it (a dead process: `noproc'; a node that is no longer connected; a
%%   pool whose Python is restarting, which has left the group) is skipped
%%   and another member is called, within the same deadline. A request
%%   already sent to a member whose node then goes down ends in
%%   `{error, {nodedown, Node}}': it may have run there, so it is re-sent
%%   elsewhere only with `retry => N' (idempotent calls), at most N times.
%%   With no member left: `{error, no_members}'.</li>
%% </ul>
%%
%% The process of this module, one per node under {@link poolport_sup},
%% publishes and collects the load figures; it also runs on nodes that only
%% call (no pools, no Python). Use the {@link poolport} module; this one is its
%% implementation.
-module(poolport_group).
-behaviour(gen_server).

%% API.
-export([start_link/0]).
-export([call/4]).
-export([cast/2]).
-export([info/1]).
-export([members/1]).
-export([join/1]).
-export([leave/1]).
-export([scope/0]).

%% Pure parts (tested inline, used by the bench).
-export([choose/3]).
-export([estimate/3]).
-export([next_step/3]).

%% gen_server.
-export([init/1]).
-export([handle_call/3]).
-export([handle_cast/2]).
-export([handle_info/2]).

-include_lib("kernel/include/logger.hrl").

%% The pg scope of the groups (also the scope process's registered name).
-define(SCOPE, poolport).
%% The pg group (in that scope) of the load publishers, one per node.
-define(PUBLISHERS, {?MODULE, publishers}).
%% Published loads: {Pid, InFlight, Workers}.
-define(LOADS, poolport_group_loads).
%% This node's calls outstanding at each member: {{MemberPid, CallerPid}}
%% (a caller has at most one call outstanding).
-define(CALLS, poolport_group_calls).
%% Default publication interval (ms).
-define(INTERVAL, 100).
%% How long the publisher waits for a local pool's counters.
-define(LOAD_TIMEOUT, 1000).
%% How long info/1 waits for the members.
-define(INFO_TIMEOUT, 5000).
%% Range of the random draws of choose/3.
-define(RANGE, 1 bsl 30).

-type group() :: atom().
%% A group name.

-type candidate(Key) :: {Key, node(), InFlight :: non_neg_integer(), Workers :: pos_integer()}.
%% A member as {@link choose/3} sees it: an opaque key (the pool's pid), its
%% node, its estimated requests in flight and its workers.

-type gone() :: {pid, pid()} | {node, node()}.
%% Members not to try again in this call.

-type step() :: {done, term()} | {failover, gone()} | {retry, gone()}.
%% What to do after one attempt (see {@link next_step/3}).

-type member_info() :: #{pool := pid(), node := node(),
                         workers := non_neg_integer() | undefined,
                         in_flight := non_neg_integer() | undefined,
                         calls => non_neg_integer(),
                         status := running | restarting | {error, term()}}.

-type info() :: #{group := group(), members := [member_info()],
                  nodes := non_neg_integer(), workers := non_neg_integer(),
                  in_flight := non_neg_integer()}.

-export_type([group/0]).
-export_type([info/0]).
-export_type([member_info/0]).

%% API.

%% @doc Start this node's load publisher, registered as `poolport_group'.
%% The `pg' scope `poolport' must be running (it is started before it by
%% {@link poolport_sup}).
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc The `pg' scope of the groups: `poolport'.
-spec scope() -> poolport.
scope() ->
    ?SCOPE.

%% @doc Call a member of `Group' with an encoded request; see the module doc
%% for the choice, failover and `Retry'. If a call was retried after a
%% nodedown and no member is left, the result is that
%% `{error, {nodedown, Node}}'.
-spec call(group(), binary(), timeout(), non_neg_integer()) ->
          {ok, term()} | {error, poolport:reason() | no_members}.
call(Group, Request, Timeout, Retry) ->
    attempt(Group, Request, poolport_server:deadline(Timeout), Retry, []).

%% @doc Cast an encoded request to a member of `Group' (chosen as for a
%% call). Fire and forget: with no member the request is lost.
-spec cast(group(), binary()) -> ok.
cast(Group, Request) ->
    case pick(Group, []) of
        none -> ok;
        Pid -> poolport_server:cast(Pid, Request)
    end.

%% @doc The members of a group, on all connected nodes (`[]' if the
%% application is not running here).
-spec members(group()) -> [pid()].
members(Group) ->
    try
        pg:get_members(?SCOPE, Group)
    catch
        error:badarg -> []  % no scope on this node
    end.

%% @doc Each member's counters, asked from all members at once (at most 5 s).
%%
%% `members' is sorted by node; a member that did not answer has
%% `status => {error, Reason}' and `undefined' counters. `workers' and
%% `in_flight' at the top are the sums over the members that answered.
-spec info(group()) -> info().
info(Group) ->
    Pids = lists:sort(fun(A, B) -> {node(A), A} =< {node(B), B} end, members(Group)),
    Requests = [{Pid, gen_server:send_request(Pid, info)} || Pid <- Pids],
    Deadline = poolport_server:deadline(?INFO_TIMEOUT),
    Members = [member_info(Pid, gen_server:wait_response(Req, poolport_server:remaining(Deadline)))
               || {Pid, Req} <- Requests],
    #{group => Group,
      members => Members,
      nodes => length(lists:usort([node(P) || P <- Pids])),
      workers => lists:sum([W || #{workers := W} <- Members, is_integer(W)]),
      in_flight => lists:sum([I || #{in_flight := I} <- Members, is_integer(I)])}.

%% @doc Make the calling process (a pool) a member of `Group'.
-spec join(group()) -> ok | {error, {no_scope, poolport}}.
join(Group) ->
    try
        pg:join(?SCOPE, Group, self())
    catch
        exit:{noproc, _} -> {error, {no_scope, ?SCOPE}}
    end.

%% @doc The calling process leaves `Group'.
-spec leave(group()) -> ok.
leave(Group) ->
    try pg:leave(?SCOPE, Group, self()) of
        _ -> ok
    catch
        exit:{noproc, _} -> ok
    end.

%% @doc Choose a member (pure).
%%
%% A member on `LocalNode' with fewer requests in flight than workers is
%% preferred (the least loaded of them). Otherwise, two distinct members are
%% drawn with the random integers `R1' and `R2' (any non-negative integers)
%% and the one whose load after one more request, `(InFlight + 1) / Workers',
%% is lower is chosen (the first drawn on a tie). The list must not be empty.
-spec choose([candidate(Key), ...], node(), {non_neg_integer(), non_neg_integer()}) -> Key.
choose([{Key, _, _, _}], _LocalNode, _Random) ->
    Key;
choose(Candidates, LocalNode, {R1, R2}) ->
    case [C || {_, Node, InFlight, Workers} = C <- Candidates,
               Node =:= LocalNode, InFlight < Workers] of
        [_ | _] = Spare ->
            element(1, lightest(Spare));
        [] ->
            N = length(Candidates),
            I = R1 rem N,
            J = (I + 1 + R2 rem (N - 1)) rem N,
            element(1, lighter(lists:nth(I + 1, Candidates), lists:nth(J + 1, Candidates)))
    end.

%% @doc A member's estimated load (pure): the larger of the `in_flight' its
%% node published and this node's calls outstanding there, and its workers
%% (at least 1; 1 while nothing was published yet).
-spec estimate({non_neg_integer(), non_neg_integer() | undefined} | none,
               integer(), pid()) -> candidate(pid()).
estimate(Published, Outstanding, Pid) ->
    {InFlight, Workers} = case Published of
                              {I, W} when is_integer(W), W > 0 -> {I, W};
                              {I, _} -> {I, 1};
                              none -> {0, 1}
                          end,
    {Pid, node(Pid), max(InFlight, max(Outstanding, 0)), Workers}.

%% @doc What to do after an attempt at `Pid' ended with `Result' (pure):
%% `{failover, Gone}' if the request was not written there (try another
%% member, no retry used), `{retry, Gone}' for a nodedown when retries are
%% left, else `{done, Result}'.
-spec next_step(term(), pid(), non_neg_integer()) -> step().
next_step({error, noproc}, Pid, _Retry) ->
    {failover, {pid, Pid}};
next_step({error, not_member}, Pid, _Retry) ->
    {failover, {pid, Pid}};
next_step({error, {not_connected, Node}}, _Pid, _Retry) ->
    {failover, {node, Node}};
next_step({error, {nodedown, Node}}, _Pid, Retry) when Retry > 0 ->
    {retry, {node, Node}};
next_step(Result, _Pid, _Retry) ->
    {done, Result}.

%% gen_server: the load publisher.

-record(state, {
    interval :: pos_integer(),
    %% Pids whose loads each node published last.
    by_node = #{} :: #{node() => [pid()]}
}).

%% @private
-spec init([]) -> {ok, #state{}}.
init([]) ->
    _ = ets:new(?LOADS, [named_table, protected, set, {read_concurrency, true}]),
    _ = ets:new(?CALLS, [named_table, public, ordered_set, {write_concurrency, true}]),
    ok = pg:join(?SCOPE, ?PUBLISHERS, self()),
    ok = net_kernel:monitor_nodes(true),
    Interval = case application:get_env(poolport, load_interval, ?INTERVAL) of
                   I when is_integer(I), I > 0 -> I;
                   _ -> ?INTERVAL
               end,
    self() ! publish,
    {ok, #state{interval = Interval}}.

%% @private
-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, {error, unknown_call}, #state{}}.
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

%% @private
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Request, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info(publish, #state{interval = Interval} = State) ->
    Loads = [Load || Pid <- local_members(), {_, _, _} = Load <- [local_load(Pid)]],
    Message = {?MODULE, loads, node(), Loads},
    _ = [erlang:send(P, Message, [noconnect, nosuspend])
         || P <- pg:get_members(?SCOPE, ?PUBLISHERS), node(P) =/= node()],
    %% Forget the calls of callers that died during their call (killed:
    %% their `after' did not run).
    _ = [ets:delete(?CALLS, Key) || {{_, Caller} = Key} <- ets:tab2list(?CALLS),
                                    not is_process_alive(Caller)],
    erlang:send_after(Interval, self(), publish),
    {noreply, store(node(), Loads, State)};
handle_info({?MODULE, loads, Node, Loads}, State) when is_list(Loads) ->
    {noreply, store(Node, Loads, State)};
handle_info({nodedown, Node}, State) ->
    {noreply, store(Node, [], State)};
handle_info(_Info, State) ->
    {noreply, State}.

%% Internal.

%% Last: the nodedown of the last retried attempt, returned if no member is
%% left to retry on (rather than `no_members', which would hide that the
%% call may have run).
-spec attempt(group(), binary(), integer() | infinity, non_neg_integer(), [gone()]) ->
          {ok, term()} | {error, term()}.
attempt(Group, Request, Deadline, Retry, Gone) ->
    attempt(Group, Request, Deadline, Retry, Gone, {error, no_members}).

attempt(Group, Request, Deadline, Retry, Gone, Last) ->
    case pick(Group, Gone) of
        none ->
            Last;
        Pid ->
            Result = call_member(Pid, Request, poolport_server:remaining(Deadline)),
            case next_step(Result, Pid, Retry) of
                {done, Done} -> Done;
                {failover, G} -> attempt(Group, Request, Deadline, Retry, [G | Gone], Last);
                {retry, G} -> attempt(Group, Request, Deadline, Retry - 1, [G | Gone], Result)
            end
    end.

%% One attempt, counted in this node's outstanding calls of the member.
-spec call_member(pid(), binary(), timeout()) -> {ok, term()} | {error, term()}.
call_member(Pid, Request, Timeout) ->
    Node = node(Pid),
    case Node =:= node() orelse lists:member(Node, nodes()) of
        false ->
            {error, {not_connected, Node}};
        true ->
            Key = {Pid, self()},
            _ = table(fun() -> ets:insert(?CALLS, {Key}) end, true),
            try
                poolport_server:member_call(Pid, Request, Timeout)
            after
                table(fun() -> ets:delete(?CALLS, Key) end, true)
            end
    end.

%% An ETS operation on a table of the publisher, or Default while the
%% publisher (re)starts and the table is not there.
-spec table(fun(() -> T), T) -> T.
table(Fun, Default) ->
    try
        Fun()
    catch
        error:badarg -> Default
    end.

%% A member of the group, not among Gone, on a connected node; `none' if
%% there is none.
-spec pick(group(), [gone()]) -> pid() | none.
pick(Group, Gone) ->
    Connected = [node() | nodes()],
    case [P || P <- members(Group), lists:member(node(P), Connected),
               not lists:member({pid, P}, Gone), not lists:member({node, node(P)}, Gone)] of
        [] -> none;
        [Pid] -> Pid;
        Pids -> choose([candidate(P) || P <- Pids], node(),
                       {rand:uniform(?RANGE), rand:uniform(?RANGE)})
    end.

-spec candidate(pid()) -> candidate(pid()).
candidate(Pid) ->
    Published = case table(fun() -> ets:lookup(?LOADS, Pid) end, []) of
                    [{_, InFlight, Workers}] -> {InFlight, Workers};
                    [] -> none
                end,
    Outstanding = table(fun() -> ets:select_count(?CALLS, [{{{Pid, '_'}}, [], [true]}]) end, 0),
    estimate(Published, Outstanding, Pid).

-spec lighter(candidate(K), candidate(K)) -> candidate(K).
lighter({_, _, I1, W1} = A, {_, _, I2, W2} = B) ->
    case (I1 + 1) * W2 =< (I2 + 1) * W1 of
        true -> A;
        false -> B
    end.

-spec lightest([candidate(K), ...]) -> candidate(K).
lightest([First | Rest]) ->
    lists:foldl(fun(C, Best) -> lighter(Best, C) end, First, Rest).

-spec member_info(pid(), term()) -> member_info().
member_info(Pid, {reply, #{} = Info}) ->
    #{pool => Pid, node => node(Pid),
      workers => maps:get(workers, Info, undefined),
      in_flight => maps:get(in_flight, Info, undefined),
      calls => maps:get(calls, Info, 0),
      status => maps:get(status, Info, running)};
member_info(Pid, Other) ->
    Reason = case Other of
                 {error, {R, _ServerRef}} -> R;
                 timeout -> timeout;
                 _ -> Other
             end,
    #{pool => Pid, node => node(Pid), workers => undefined, in_flight => undefined,
      status => {error, Reason}}.

%% The pools of this node that are in a group.
-spec local_members() -> [pid()].
local_members() ->
    lists:usort([P || G <- pg:which_groups(?SCOPE), is_atom(G),
                      P <- pg:get_local_members(?SCOPE, G)]).

-spec local_load(pid()) -> {pid(), non_neg_integer(), non_neg_integer() | undefined} | error.
local_load(Pid) ->
    try gen_server:call(Pid, info, ?LOAD_TIMEOUT) of
        #{in_flight := InFlight, workers := Workers} -> {Pid, InFlight, Workers};
        _ -> error
    catch
        exit:_ -> error
    end.

%% Replace what Node published last.
-spec store(node(), list(), #state{}) -> #state{}.
store(Node, Loads, #state{by_node = ByNode} = State) ->
    Pids = [Pid || {Pid, _, _} <- Loads],
    _ = [ets:delete(?LOADS, Old) || Old <- maps:get(Node, ByNode, []),
                                    not lists:member(Old, Pids)],
    true = ets:insert(?LOADS, [L || {Pid, _, _} = L <- Loads, is_pid(Pid)]),
    State#state{by_node = case Pids of
                              [] -> maps:remove(Node, ByNode);
                              _ -> ByNode#{Node => Pids}
                          end}.

-ifdef(TEST).
-include_lib("eunit/include/eunit.hrl").

%% Candidates with atoms as keys and made-up node names.
choose_test_() ->
    A = {a, 'n1@h', 0, 2},
    B = {b, 'n2@h', 5, 2},
    C = {c, 'n3@h', 1, 2},
    [{"a single member", ?_assertEqual(a, choose([A], 'x@h', {0, 0}))},
     {"the lighter of the two drawn",
      [?_assertEqual(a, choose([A, B], 'x@h', {0, 0})),
       ?_assertEqual(a, choose([A, B], 'x@h', {1, 0})),
       ?_assertEqual(c, choose([A, B, C], 'x@h', {1, 0})),   % b vs c
       ?_assertEqual(c, choose([A, B, C], 'x@h', {2, 1}))]},  % c vs b
     {"the two drawn are distinct, for any draw",
      ?_assertEqual([], [{R1, R2} || R1 <- lists:seq(0, 20), R2 <- lists:seq(0, 20),
                                     choose([B, A], 'x@h', {R1, R2}) =/= a])},
     {"loads are relative to the workers",
      ?_assertEqual(big, choose([{small, 'n1@h', 1, 1}, {big, 'n2@h', 3, 8}], 'x@h', {0, 0}))},
     {"a tie goes to the first drawn",
      ?_assertEqual(y, choose([{x, 'n1@h', 1, 1}, {y, 'n2@h', 1, 1}], 'x@h', {1, 0}))},
     {"a local member with a free worker wins",
      ?_assertEqual(b, choose([A, {b, 'x@h', 1, 2}, C], 'x@h', {0, 0}))},
     {"the least loaded local member",
      ?_assertEqual(l2, choose([{l1, 'x@h', 3, 4}, A, {l2, 'x@h', 0, 2}], 'x@h', {0, 0}))},
     {"a busy local member is compared like the others",
      ?_assertEqual(a, choose([A, {b, 'x@h', 2, 2}], 'x@h', {1, 0}))}].

%% Drawing two and keeping the lighter: a member far busier than the others
%% is chosen only when it is compared with an even busier one.
choose_spread_test() ->
    Cs = [{a, 'n1@h', 0, 1}, {b, 'n2@h', 0, 1}, {busy, 'n3@h', 10, 1}],
    Picks = [choose(Cs, 'x@h', {R1, R2}) || R1 <- lists:seq(0, 30), R2 <- lists:seq(0, 30)],
    ?assertEqual(0, length([x || busy <- Picks])),
    ?assert(length([x || a <- Picks]) > 300),
    ?assert(length([x || b <- Picks]) > 300).

estimate_test_() ->
    P = self(),
    N = node(),
    [?_assertEqual({P, N, 0, 1}, estimate(none, 0, P)),
     ?_assertEqual({P, N, 3, 1}, estimate(none, 3, P)),
     ?_assertEqual({P, N, 5, 4}, estimate({5, 4}, 2, P)),
     ?_assertEqual({P, N, 7, 4}, estimate({5, 4}, 7, P)),
     ?_assertEqual({P, N, 2, 1}, estimate({2, undefined}, 0, P)),
     ?_assertEqual({P, N, 2, 1}, estimate({2, 0}, -1, P))].

next_step_test_() ->
    P = self(),
    [?_assertEqual({failover, {pid, P}}, next_step({error, noproc}, P, 0)),
     ?_assertEqual({failover, {pid, P}}, next_step({error, not_member}, P, 0)),
     ?_assertEqual({failover, {node, 'n@h'}}, next_step({error, {not_connected, 'n@h'}}, P, 0)),
     ?_assertEqual({done, {error, {nodedown, 'n@h'}}}, next_step({error, {nodedown, 'n@h'}}, P, 0)),
     ?_assertEqual({retry, {node, 'n@h'}}, next_step({error, {nodedown, 'n@h'}}, P, 2)),
     ?_assertEqual({done, {ok, 1}}, next_step({ok, 1}, P, 3)),
     ?_assertEqual({done, {error, timeout}}, next_step({error, timeout}, P, 3)),
     ?_assertEqual({done, {error, port_closed}}, next_step({error, port_closed}, P, 3))].

-endif.
