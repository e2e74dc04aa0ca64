"""What the tests share: the session's broker as tests see it, servers and stacks to run
the services against, waiting, recording the bus's events, Redis databases of a test's own,
and looking for leaked secrets.

Importable as ``support`` because ``tests/`` is on ``sys.path`` (the root conftest lives
there). Fixtures built on these live in ``tests/conftest.py``.
"""
