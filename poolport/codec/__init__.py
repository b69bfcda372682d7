"""The term codec: Erlang External Term Format <-> Python values.

``etf`` encodes and decodes (with ``_cetf``, its optional C accelerator);
``terms`` holds the Python types for Erlang terms that have no Python twin
(``Atom``, ``Pid``, ``MapKey``, ...). Nothing here knows about frames, calls
or processes.
"""
