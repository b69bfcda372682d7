#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noshell +pc unicode
%% A real Erlang VM calling typed Python handlers through a port to `poolport serve`.
%% Used by tests/test_typed.py:
%%
%%   escript typed_client.escript Python -- ServeArg...
%%
%% Prints one line per call, "Label => Reply" (the reply term in full, on one line,
%% UTF-8; a non-ASCII binary shows as <<"..."/utf8>>), then "done". The calls are
%% pipelined: all written first, then the replies read in order.
-mode(compile).

main([Python, "--" | ServeArgs]) ->
    ok = io:setopts(standard_io, [{encoding, unicode}]),  % UTF-8 out, whatever the locale
    Port = open_port({spawn_executable, Python},
                     [{args, ["-m", "poolport", "serve" | ServeArgs]},
                      {packet, 4}, binary, exit_status]),
    Calls = calls(),
    [port_command(Port, term_to_binary({call, M, F, A})) || {_, M, F, A} <- Calls],
    [report(Label, receive_reply(Port)) || {Label, _, _, _} <- Calls],
    io:format("done~n"),
    port_close(Port),
    halt(0);
main(_) ->
    io:format("usage: typed_client.escript Python -- ServeArg...~n"),
    halt(2).

calls() ->
    [%% text: a binary (Erlang/Elixir string), a charlist, an atom -- all arrive as str
     {greet_binary, pp_typed, greet, [<<"World">>]},
     {greet_charlist, pp_typed, greet, ["World"]},
     {greet_atom, pp_typed, greet, ['World']},
     {greet_unicode, pp_typed, greet, ["Jos\x{e9} \x{4e16}\x{754c}"]},
     {greet_utf8_binary, pp_typed, greet, [<<"Jos\x{e9}"/utf8>>]},
     {greet_integer, pp_typed, greet, [42]},
     {greet_bad_utf8, pp_typed, greet, [<<255, 254>>]},
     {greet_arity, pp_typed, greet, [<<"a">>, <<"b">>]},
     %% numbers, booleans, bytes
     {add, pp_typed, add, [2, 40]},
     {add_bignum, pp_typed, add, [1 bsl 70, 1]},
     {add_binary, pp_typed, add, [1, <<"2">>]},
     {scale_int_to_float, pp_typed, scale, [3]},
     {scale_float, pp_typed, scale, [1.5, 4.0]},
     {negate, pp_typed, negate, [true]},
     {size_binary, pp_typed, size, [<<1, 2, 3>>]},
     {size_charlist, pp_typed, size, ["abc"]},
     {types, pp_typed, types_of, [<<"n">>, <<"d">>, 7, 2, [<<"x">>, "y", z]]},
     %% containers
     {total_list, pp_typed, total, [[1, 2, 3]]},
     {total_charlist, pp_typed, total, ["abc"]},
     {total_bad_item, pp_typed, total, [[1, two, 3]]},
     {swap, pp_typed, swap, [{7, <<"seven">>}]},
     {weigh, pp_typed, weigh, [#{<<"b">> => 2, a => 1.5}]},
     {maybe_undefined, pp_typed, maybe, [undefined]},
     {maybe_default, pp_typed, maybe, []},
     {maybe_charlist, pp_typed, maybe, ["Zoe"]},
     {summed, pp_typed, summed, [1, 2, 3, 4]},
     {summed_bad, pp_typed, summed, [1, 2, <<"3">>]},
     %% structs and dataclasses from maps with atom or binary keys; results as atom-keyed maps
     {describe_atom_keys, pp_typed, describe, [#{name => <<"Ann">>, age => 30, tags => ["a", b]}]},
     {describe_binary_keys, pp_typed, describe, [#{<<"name">> => "Bob", <<"age">> => 7}]},
     {describe_wrong_type, pp_typed, describe, [#{name => <<"Ann">>, age => <<"old">>}]},
     {describe_missing, pp_typed, describe, [#{name => <<"Ann">>}]},
     {describe_not_a_map, pp_typed, describe, [[1, 2]]},
     {birthday, pp_typed, birthday, [#{name => <<"Ann">>, age => 30}]},
     {mirror, pp_typed, mirror, [#{x => 1, y => -2.5}]},
     %% enums: atom in, atom out
     {next_color, pp_typed, next_color, [blue]},
     {next_color_bad, pp_typed, next_color, [purple]},
     %% explicit Erlang types
     {charlist_out, pp_typed, as_charlist, [<<"hi">>]},
     {atom_out, pp_typed, as_atom, [<<"made_in_python">>]},
     {bits_out, pp_typed, as_bits, []},
     {pid_echo, pp_typed, pid_echo, [self()]},
     {pid_bad, pp_typed, pid_echo, [<<"pid">>]},
     {improper, pp_typed, split_improper, [[1, 2 | tail]]},
     {raw_untyped, pp_typed, raw, [<<"as is">>]},
     %% decorator alias; the example module (worker_init state, Struct in and out)
     {alias, pp_typed, hello, [<<"Erlang">>]},
     {alias_hides_python_name, pp_typed, greet_impl, [<<"Erlang">>]},
     {example_greet, typed_handlers, greet, ["World"]},
     {example_quote, typed_handlers, quote, [#{item => <<"tea">>, quantity => 3, unit_price => 2.5}]},
     {example_classify, typed_handlers, classify, [<<"I love it, great stuff">>]},
     {example_words, typed_handlers, words, ["to be or not", 3]}].

report(pid_echo, Reply) ->  % a pid goes to Python and comes back as the very same pid
    io:format("pid_echo => ~p~n", [Reply =:= {reply, self()}]);
report(Label, Reply) ->
    Text = io_lib_pretty:print(Reply, [{encoding, unicode}, {line_length, 1000000}]),
    io:format("~ts => ~ts~n", [Label, Text]).

receive_reply(Port) ->
    receive
        {Port, {data, Data}} ->
            binary_to_term(Data);
        {Port, {exit_status, S}} ->
            io:format("error poolport exited with status ~b~n", [S]),
            halt(1)
    after 60000 ->
        io:format("error no reply within 60 s~n"),
        halt(1)
    end.
