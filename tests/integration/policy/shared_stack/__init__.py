"""Policy tests that share one stack: a package, so that its package-scoped stack stops
when its last test is done (without it pytest keeps that stack until the session ends,
and its store and policy would compete for the shared broker's service queues with the
stacks the other policy tests start for themselves).
"""
