"""What the tests share: the session's broker as tests see it (broker), stacks to run the
services against (in_process_store, policy_stack), waiting (waiting), recording the bus's
events (events) or what an in-process component published (recording_publisher), bus
clients and Redis databases a test has to itself (bus_clients, redis_db), emptying the
service queues (bus_hygiene), this process's children (process_table), and looking for
leaked secrets (leak_scan).

Importable as ``support`` because ``tests/`` is on ``sys.path`` (the root conftest lives
there). The fixtures built on these (``connect_bus``, ``private_redis``, ``kek``,
``kek_file``) are in ``tests/conftest.py``.
"""
