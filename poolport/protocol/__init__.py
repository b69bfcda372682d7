"""The wire protocol, sans-IO: what the bytes on the port mean.

``framing`` splits the port's byte stream into ``{packet, N}`` frames;
``bert`` reads BERT-RPC requests and builds replies; ``control`` the pool's
own ``'$poolport'`` requests; ``streams`` and ``callbacks`` the frames of
streamed results and of calls from Python into Erlang. Pure functions and
small state machines, unit-tested without processes.
"""
