%% An EUnit listener (rebar.config's eunit_opts) that sends the logger's output
%% to _build/test/logs/eunit.log for the whole run. The tests kill, crash and
%% misalign pools on purpose; their crash, error and supervisor reports would
%% otherwise fill the terminal and bury EUnit's own report of what failed.
%% (The reports are written as they come; terminate/2 only flushes the file.)
-module(poolport_eunit_log).
-behaviour(eunit_listener).

-export([start/0, start/1]).
-export([init/1, handle_begin/3, handle_end/3, handle_cancel/3, terminate/2]).

start() -> start([]).

start(Options) -> eunit_listener:start(?MODULE, Options).

init(_Options) ->
    File = filename:absname("_build/test/logs/eunit.log"),
    ok = filelib:ensure_dir(File),
    _ = logger:remove_handler(default),
    ok = logger:add_handler(default, logger_std_h, #{config => #{file => File, modes => [write]}}),
    File.

handle_begin(_Kind, _Data, File) -> File.

handle_end(_Kind, _Data, File) -> File.

handle_cancel(_Kind, _Data, File) -> File.

terminate(_Result, _File) ->
    logger_std_h:filesync(default).
