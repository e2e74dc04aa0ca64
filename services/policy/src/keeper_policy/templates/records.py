"""Policy's template records in Redis: one hash of templates by id, one of ids by name.

The name hash is claimed with HSETNX, so two replicas creating two templates of one name
at once cannot both win.
"""

from __future__ import annotations

from redis.asyncio import Redis

from keeper_policy.storage.keys import TEMPLATE_NAMES, TEMPLATES
from keeper_shared.messages.template import TemplateView
from keeper_shared.redis_access.results import awaited


def _text(value: object) -> str | None:
    """A Redis reply as text (the client returns bytes; its stubs say str)."""
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)


class TemplateRecords:
    """Redis access for templates."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

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

    async def claim_name(self, name: str, template_id: str) -> str | None:
        """Reserve ``name`` for ``template_id``; the other template that has it, or None."""
        await awaited(self._redis.hsetnx(TEMPLATE_NAMES, name, template_id))
        holder = _text(await awaited(self._redis.hget(TEMPLATE_NAMES, name)))
        return holder if holder != template_id else None

    async def release_name(self, name: str, template_id: str) -> None:
        """Give ``name`` back when the template that claimed it was not created."""
        holder = _text(await awaited(self._redis.hget(TEMPLATE_NAMES, name)))
        if holder == template_id:
            await awaited(self._redis.hdel(TEMPLATE_NAMES, name))

    async def save(self, template: TemplateView) -> None:
        """Record a template (its name claimed first)."""
        await awaited(self._redis.hset(TEMPLATES, template.template_id, template.model_dump_json()))

    async def delete(self, template: TemplateView) -> None:
        """Forget a template and its name."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(TEMPLATES, template.template_id)
        pipe.hdel(TEMPLATE_NAMES, template.name)
        await pipe.execute()
