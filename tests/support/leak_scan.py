"""Looking for secret bytes in text and files, in every form they could leak in."""

from __future__ import annotations

import base64
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

from redis.asyncio import Redis

from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.compression import compress


def leak_forms(secret: bytes) -> list[bytes]:
    """Raw, hex (both cases) and base64 (standard and urlsafe) renderings of ``secret``."""
    hex_lower = secret.hex().encode()
    return [
        secret,
        hex_lower,
        hex_lower.upper(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def content_fingerprints(content: bytes, *, chunk: int = 30) -> list[bytes]:
    """Forms of 30-byte chunks of ``content`` and of its compressed forms: the zstd frame
    it travels and rests as, and the zlib stream older versions stored and exported.

    Chunks start at multiples of 3 so their base64 is also a substring of the base64 of the
    whole; a log line carrying any encoding of the whole content contains one of these.
    """
    streams = [content, compress(content), zlib.compress(content, 6)]
    forms: list[bytes] = []
    for stream in streams:
        for start in range(0, max(len(stream) - chunk, 1), 3 * 97):
            piece = stream[start : start + chunk]
            if len(set(piece)) > 4:  # runs of 0x00/0xff are not secrets and match anything
                forms.extend(leak_forms(piece))
    return forms


def find_leaks(haystacks: Iterable[tuple[str, bytes]], needles: list[bytes]) -> list[str]:
    """Names of the haystacks that contain any needle."""
    return [name for name, data in haystacks if any(needle in data for needle in needles)]


async def every_redis_value(redis: Redis) -> AsyncIterator[tuple[bytes, bytes]]:
    """Every value of every key in the database, of every type, with its key (a hash
    field as ``field=value``), to scan what is stored at rest."""
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            yield key, await awaited(redis.get(key))
        elif kind == "hash":
            for field, value in (await awaited(redis.hgetall(key))).items():
                yield key, field + b"=" + value
        elif kind == "list":
            for value in await awaited(redis.lrange(key, 0, -1)):
                yield key, value
        elif kind == "set":
            for value in await awaited(redis.smembers(key)):
                yield key, value
        elif kind == "zset":
            for value in await awaited(redis.zrange(key, 0, -1)):
                yield key, value


def read_files(paths: Iterable[Path]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every file at or under ``paths`` (directories walked; missing
    paths skipped: a server that never logged has no log)."""
    for path in paths:
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                yield str(file), file.read_bytes()
