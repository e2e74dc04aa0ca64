"""The Prometheus metrics of vTPM Keeper, defined once; each service updates its own.

Names follow Prometheus conventions (``_total`` counters, base units). Labels never carry a
VM id (unbounded cardinality) or anything secret.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_HANDLED = Counter(
    "keeper_messages_handled_total",
    "Messages taken from a queue, by message type and outcome "
    "(ok, failed = requeued, refused = dead-lettered, expired, ignored).",
    ["type", "outcome"],
)
PULLS = Counter(
    "keeper_pulls_total",
    "State fetches the store sent to a host, by outcome (ok, failed).",
    ["outcome"],
)
INLINE_STATES = Counter(
    "keeper_inline_states_total",
    "States a host sent inline with its change, by outcome (opened = stored without a "
    "fetch, pulled = it did not open with the store's keys and was fetched instead).",
    ["outcome"],
)
PULLED_BYTES = Counter(
    "keeper_pulled_bytes_total",
    "Uncompressed bytes of state received from hosts, by kind (tpm, nvram).",
    ["kind"],
)
PERSISTED = Counter(
    "keeper_persisted_versions_total",
    "Writes the store attempted, by kind and outcome (stored, duplicate, stale, "
    "wrong_host, stale_epoch, refused = the blob did not verify).",
    ["kind", "outcome"],
)
TPM_IDENTITY_UNREADABLE = Counter(
    "keeper_tpm_identity_unreadable_total",
    "TPM versions stored whose identity (endorsement seed) could not be read, so a TPM "
    "replaced unasked cannot be told apart (encrypted without the secret, or not swtpm's "
    "format); the store logs each VM once per reason.",
)
PERSIST_SECONDS = Histogram(
    "keeper_persist_seconds",
    "Time from receiving a blob to its durable, fenced write (verify, encrypt, Redis).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RETRIEVAL_ATTEMPTS = Counter(
    "keeper_retrieval_attempts_total",
    "Attempts to retrieve a VM's final state before it is destroyed (one state.retrieve).",
)
RETRIEVAL_FAILURES = Counter(
    "keeper_retrieval_failures_total",
    "Retrieval attempts that failed (host did not answer, or persisting failed).",
)
RETRIEVALS_ABANDONED = Counter(
    "keeper_retrievals_abandoned_total",
    "Stops whose retrieval gave up after every attempt: the destroy went ahead and the "
    "possible loss was recorded (policy).",
)
RECOVERY_POINT_AGE_SECONDS = Histogram(
    "keeper_recovery_point_age_seconds",
    "Age of the newest persisted state when it was needed (a stop that could not retrieve, "
    "a live snapshot, a host lost): how much a restore would roll back.",
    buckets=(1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600),
)
DEAD_LETTERED = Counter(
    "keeper_dead_lettered_total",
    "Messages this process rejected into a dead-letter queue, by message type.",
    ["type"],
)
DEAD_LETTER_QUEUE_DEPTH = Gauge(
    "keeper_dead_letter_queue_messages",
    "Messages waiting in a dead-letter queue (polled).",
    ["queue"],
)
STATE_CHANGES_PUBLISHED = Counter(
    "keeper_state_changes_published_total",
    "state.changed events a host agent published, by kind.",
    ["kind"],
)
EVENT_CONFIRMS_LATE = Counter(
    "keeper_event_confirms_late_total",
    "Events the broker did not confirm within the bound (published again, or failed): a "
    "broker overloaded or a connection lost mid-publish.",
)
READY = Gauge("keeper_ready", "1 while the process reports itself ready.")
