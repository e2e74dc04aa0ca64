"""``python -m keeper_api.openapi [--check] [--output PATH]``: the API's OpenAPI document,
generated from its routes and models and committed as ``docs/openapi.json`` (a test fails
when the two drift apart, as for ``docs/asyncapi.json``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keeper_api.app import create_app


def render() -> str:
    """The document as committed: sorted keys, two-space indent, a final newline."""
    return json.dumps(create_app(None).openapi(), indent=2, sort_keys=True) + "\n"


def default_output() -> Path:
    """``docs/openapi.json`` of the checkout this package lives in (or the current dir)."""
    for candidate in Path(__file__).resolve().parents:
        if (candidate / "deploy" / "local").is_dir():
            return candidate / "docs" / "openapi.json"
    return Path.cwd() / "docs" / "openapi.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keeper_api.openapi", description="Generate the API's OpenAPI document."
    )
    parser.add_argument("--output", type=Path, default=None, help="default: docs/openapi.json")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the file differs, write nothing"
    )
    args = parser.parse_args(argv)
    output: Path = args.output or default_output()
    text = render()
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else ""
        if current != text:
            print(f"{output} is out of date: run `python -m keeper_api.openapi`")
            return 1
        print(f"{output} is current")
        return 0
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
