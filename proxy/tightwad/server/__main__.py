"""Run the proxy: ``python -m tightwad.server [--config FILE]``.

Reads the YAML config (``TIGHTWAD_<SECTION>__<KEY>`` variables override it, see
:mod:`tightwad.config`), refuses to serve a non-loopback address without a token, and serves the
OpenAI API until SIGINT/SIGTERM. Configuration problems are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tightwad.config import ConfigError, check_bind_security, load_config


def parser() -> argparse.ArgumentParser:
    """The options, shared with ``tightwad serve``."""
    parser = argparse.ArgumentParser(prog="python -m tightwad.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file (default: built-in defaults plus environment)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config (and the bind/token rule), print nothing, exit")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        check_bind_security(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check:
        return 0
    # Here, not at the top: `tightwad --help` builds this parser and needs none of the server.
    from tightwad.server.app import create_app
    from tightwad.server.listen import serve

    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The connection cap, header and keep-alive timeouts, handler cancellation (a client that
    # disconnects cancels its request's upstream work): tightwad.server.listen.
    serve(create_app(config), config.listen, ready=lambda: logging.getLogger(
        "tightwad.server").info("serving the OpenAI API on http://%s:%d/v1",
                                config.listen.host, config.listen.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
