"""vTPM Keeper's HTTP API and web console (``python -m keeper_api``).

A bus client like the ``keeper`` CLI: every route sends the CLI's requests and queries to
policy and the state store (:mod:`keeper_shared.keeper_client`) and answers with what they
said; failures are RFC 9457 problem details carrying the CLI's reasons (``docs/api.md``).
It keeps nothing of its own but long operations' outcomes, in Redis under its own user, so
any replica can answer a poll."""
