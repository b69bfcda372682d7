"""The command line (``cli``) and what it runs besides the server: ``demo``,
``bench`` with its single-process reference port (``bench_reference``), and
the Erlang load generators (``*.escript``) they drive the port from."""
