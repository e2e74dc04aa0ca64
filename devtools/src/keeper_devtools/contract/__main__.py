"""``python -m keeper_devtools.contract [--check] [--output PATH]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keeper_devtools.contract.asyncapi import render


def default_output() -> Path:
    """``docs/asyncapi.json`` of the checkout this package lives in (or the current dir)."""
    here = Path(__file__).resolve()
    for candidate in here.parents:
        if (candidate / "deploy" / "local").is_dir():
            return candidate / "docs" / "asyncapi.json"
    return Path.cwd() / "docs" / "asyncapi.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keeper_devtools.contract",
        description="Generate the AsyncAPI document of the message contract.",
    )
    parser.add_argument("--output", type=Path, default=None, help="default: docs/asyncapi.json")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the file differs, write nothing"
    )
    args = parser.parse_args(argv)
    output: Path = args.output or default_output()
    text = render()
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else ""
        if current != text:
            print(f"{output} is out of date: run `python -m keeper_devtools.contract`")
            return 1
        print(f"{output} is current")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
