"""``python -m keeper_shared.cli``."""

from keeper_shared.cli import main

main()
