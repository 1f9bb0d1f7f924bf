"""``tightwad serve``: run the proxy in the foreground, exactly ``python -m tightwad.server``."""

from __future__ import annotations

import argparse

from tightwad.server import __main__ as server_main


def add_parser(sub: argparse._SubParsersAction) -> None:
    # The server's own parser as parent: both commands take the same options, always.
    p = sub.add_parser("serve", parents=[server_main.parser()], add_help=False,
                       help="run the proxy (the OpenAI API on :8088) in the foreground",
                       description="Run the Tightwad proxy until SIGINT/SIGTERM: the same as "
                       "python -m tightwad.server. A config problem is one line and exit code 2.")
    p.set_defaults(func=server_main.run)
