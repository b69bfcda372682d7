"""``poolport serve``: the dispatcher process and its worker processes.

``dispatcher`` owns the port's stdin/stdout and routes frames; ``worker`` (and
``stream_worker``) decode, call and encode. Between them: ``link`` (messages
over a socketpair), ``ledger`` with ``pending`` and ``reorder`` (request order,
exactly once; sans-IO), ``outbox`` (what a peer has not taken yet),
``progress`` (shared memory a worker writes as it starts and ends a call),
``stats``, ``watch`` (reload on file change), ``spin`` and ``memory``.
"""
