"""Policy's template records in Redis: one hash of templates by id, one of ids by name.

A template and its name are written by one script, so two replicas creating two templates
of one name at once cannot both win, and no name is ever held by a template that is not
recorded.
"""

from __future__ import annotations

from redis.asyncio import Redis

from keeper_policy.storage.keys import TEMPLATE_NAMES, TEMPLATES
from keeper_policy.storage.scripts import PolicyScripts
from keeper_shared.messages.template import TemplateView
from keeper_shared.redis_access.results import awaited


def _text(value: object) -> str | None:
    """A Redis reply as text (the client returns bytes; its stubs say str)."""
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)


class TemplateRecords:
    """Redis access for templates."""

    def __init__(self, redis: Redis, scripts: PolicyScripts) -> None:
        self._redis = redis
        self._save = scripts.template_save

    async def template(self, template_id: str) -> TemplateView | None:
        """The template of this id, or None."""
        raw = await awaited(self._redis.hget(TEMPLATES, template_id))
        return TemplateView.model_validate_json(raw) if raw else None

    async def all(self) -> list[TemplateView]:
        """Every template, by name."""
        raw = await awaited(self._redis.hvals(TEMPLATES))
        return sorted(
            (TemplateView.model_validate_json(item) for item in raw), key=lambda t: t.name
        )

    async def holder_of(self, name: str) -> str | None:
        """The id of the template named ``name``, or None."""
        return _text(await awaited(self._redis.hget(TEMPLATE_NAMES, name)))

    async def save(self, template: TemplateView) -> str | None:
        """Record a template and its name in one step, unless another template has the
        name: then nothing is written and that template's id is returned."""
        holder = await self._save(
            keys=[TEMPLATE_NAMES, TEMPLATES],
            args=[template.name, template.template_id, template.model_dump_json()],
        )
        holder_id = _text(holder)
        return holder_id or None

    async def delete(self, template: TemplateView) -> None:
        """Forget a template and its name."""
        # A block: a Redis Cluster transaction hands its connection back only on reset.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(TEMPLATES, template.template_id)
            pipe.hdel(TEMPLATE_NAMES, template.name)
            await pipe.execute()
