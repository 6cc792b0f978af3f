"""Store fixtures shared by the conformance suite and the HTTP tests.

``make_store`` is parametrized over every store; each param builds a fresh
store on fresh backing storage, and ``reopen`` gives a new instance over the
same storage (a restart).
"""
