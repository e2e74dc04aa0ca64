"""Policy tests on hosts configured otherwise than by default (adoption modes, an older
swtpm), sharing one stack: a package, so that its package-scoped stack stops when its
last test is done, before the other policy tests start stacks of their own on the same
service queues.
"""
