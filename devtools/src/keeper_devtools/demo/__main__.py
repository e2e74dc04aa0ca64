"""`python -m keeper_devtools.demo`: run the story against the local stack; exit 0 if it held."""

from __future__ import annotations

import asyncio
import sys

from keeper_devtools.demo.story import DemoConfig, StoryFailed, run_story
from keeper_devtools.localstack.settings import LocalStackSettings


def main() -> None:
    """Run the story against the local stack started by ``deploy/local/stack start``."""
    stack = LocalStackSettings()
    run_dir = stack.run_dir.parent
    config = DemoConfig(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{stack.rabbitmq_port}/",
        redis_url=f"redis://127.0.0.1:{stack.redis_port}/0",
        work_dir=run_dir / "demo",
        kek_file=run_dir / "keys" / "kek.key",
    )
    try:
        asyncio.run(run_story(config, sys.stdout))
    except Exception as error:  # every failure ends the demo the same way: a reason, exit 1
        reason = (
            str(error) if isinstance(error, StoryFailed) else f"{type(error).__name__}: {error}"
        )
        print(f"DEMO FAILED: {reason}", file=sys.stderr)
        print(f"service logs: {config.work_dir / 'logs'}", file=sys.stderr)
        sys.exit(1)
    print(f"demo passed; service logs in {config.work_dir / 'logs'}")


if __name__ == "__main__":
    main()
