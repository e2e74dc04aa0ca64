"""``python -m keeper_cli``."""

from keeper_cli import main

main()
