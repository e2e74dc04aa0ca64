"""Policy's Lua scripts, registered once per Redis client (redis-py runs them by SHA and
reloads them after a Redis restart)."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _load(redis: Redis, name: str) -> AsyncScript:
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    return redis.register_script(text)


class PolicyScripts:
    """Every script policy runs; see each ``lua/<name>.lua`` for what it does."""

    def __init__(self, redis: Redis) -> None:
        self.place = _load(redis, "place")
        self.unplace = _load(redis, "unplace")
        self.place_undo = _load(redis, "place_undo")
        self.mark_lost = _load(redis, "mark_lost")
        self.migrate = _load(redis, "migrate")
        self.persisted = _load(redis, "persisted")
        self.host_beat = _load(redis, "host_beat")
        self.declare_lost = _load(redis, "declare_lost")
        self.workflow_create = _load(redis, "workflow_create")
        self.workflow_advance = _load(redis, "workflow_advance")
        self.workflow_finish = _load(redis, "workflow_finish")
        self.lease_renew = _load(redis, "lease_renew")
        self.lease_release = _load(redis, "lease_release")
        self.index_drop = _load(redis, "index_drop")
        self.forget = _load(redis, "forget")
        self.versions_forget = _load(redis, "versions_forget")
        self.tpm_reset = _load(redis, "tpm_reset")
        self.template_save = _load(redis, "template_save")
        self.name_claim = _load(redis, "name_claim")
        self.name_release = _load(redis, "name_release")
