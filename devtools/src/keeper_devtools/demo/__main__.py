"""`python -m keeper_devtools.demo`: run the story against the local stack; exit 0 if it held."""

from __future__ import annotations

import asyncio
import sys

from keeper_devtools.demo.story import DemoConfig, StoryFailed, run_story
from keeper_devtools.localstack.redis_users import API, POLICY, STORE
from keeper_devtools.localstack.settings import LocalStackSettings


def main() -> None:
    """Run the story against the local stack started by ``deploy/local/stack start``."""
    stack = LocalStackSettings()
    run_dir = stack.run_dir.parent
    config = DemoConfig(
        amqp_url=stack.rabbitmq_node().amqp_url,
        redis_url=stack.redis_url_for(STORE),
        policy_redis_url=stack.redis_url_for(POLICY),
        api_redis_url=stack.redis_url_for(API),
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
