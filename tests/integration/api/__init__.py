"""The API's and the console's tests: a package, so that its package-scoped stack stops
when its last test is done (without it pytest keeps that stack until the session ends,
and its store and agents compete for the shared broker's queues with later tests').
"""
