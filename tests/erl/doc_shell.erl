%% Evaluate a file of Erlang shell input as the shell would: one `.`-terminated
%% form at a time, each form's bindings carried into the next. The first
%% exception (a badmatch, say) is printed and the node halts with status 1,
%% so a documentation snippet that no longer works fails its test.
-module(doc_shell).
-export([main/1]).

-spec main([string()]) -> no_return().
main([File]) ->
    {ok, Bin} = file:read_file(File),
    Status = try eval(unicode:characters_to_list(Bin), 1, erl_eval:new_bindings()) of
                 ok -> 0
             catch
                 Class:Reason:Stack ->
                     io:format(standard_error, "doc_shell: ~p:~tp~n~tp~n", [Class, Reason, Stack]),
                     1
             end,
    erlang:halt(Status).

eval(Text, Line, Bindings) ->
    case erl_scan:tokens([], Text, Line) of
        {done, {ok, Tokens, End}, Rest} ->
            {ok, Exprs} = erl_parse:parse_exprs(Tokens),
            {value, _, Next} = erl_eval:exprs(Exprs, Bindings),
            eval(Rest, End, Next);
        {done, {eof, _}, _} ->
            ok;
        {done, {error, Info, _}, _} ->
            error({scan_error, Info});
        {more, Cont} ->
            case erl_scan:tokens(Cont, eof, Line) of
                {done, {eof, _}, _} -> ok;
                _ -> error({snippet_does_not_end_with_a_dot, Line})
            end
    end.
