"""`python -m keeper_devtools.demo`: run the story against the local stack; exit 0 if it held.
``--keep-serving`` (``make console``): then keep the services and the console running until
Ctrl-C or SIGTERM, to look at the demo's VM in the browser."""

from __future__ import annotations

import asyncio
import signal
import sys

from keeper_devtools.demo.story import DemoConfig, StoryFailed, run_story
from keeper_devtools.localstack.redis_users import API, POLICY, STORE
from keeper_devtools.localstack.settings import LocalStackSettings


async def _until_stopped(console_url: str) -> None:
    """Return on Ctrl-C or SIGTERM (the story then stops every service as usual)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"open {console_url}; Ctrl-C stops the services", flush=True)
    await stop.wait()


def main() -> None:
    """Run the story against the local stack started by ``deploy/local/stack start``."""
    stack = LocalStackSettings()
    run_dir = stack.run_dir.parent
    node = stack.rabbitmq_node()
    config = DemoConfig(
        amqp_url=node.amqp_url,
        broker=node,
        redis_url=stack.redis_url_for(STORE),
        policy_redis_url=stack.redis_url_for(POLICY),
        api_redis_url=stack.redis_url_for(API),
        work_dir=run_dir / "demo",
        kek_file=run_dir / "keys" / "kek.key",
    )
    try:
        keep_serving = _until_stopped if "--keep-serving" in sys.argv[1:] else None
        asyncio.run(run_story(config, sys.stdout, keep_serving=keep_serving))
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
