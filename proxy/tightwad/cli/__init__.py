"""The ``tightwad`` command line: init, doctor, start, stop, status, swap, bench, serve.

Every command exits 0 on success and non-zero with one readable ``error:`` line otherwise
(2 for bad usage or input, 1 for a failure found or met); no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.markup import escape

from tightwad import __version__
from tightwad.build import PIN_COMMIT
from tightwad.cli.common import CliError, err_console


def version() -> str:
    """The package's version and the llama.cpp commit every host of its pools runs."""
    return f"tightwad {__version__} (llama.cpp {PIN_COMMIT})"


def _parser() -> argparse.ArgumentParser:
    from tightwad.cli import bench, doctor, init, pool, serve, swap

    parser = argparse.ArgumentParser(
        prog="tightwad", description="Pool mismatched machines into one OpenAI-compatible "
        "endpoint. Quick start: tightwad init, tightwad doctor, tightwad start.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    init.add_parser(sub)
    doctor.add_parser(sub)
    pool.add_parsers(sub)
    swap.add_parser(sub)
    bench.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # the promise: one line, no traceback
        err_console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: "
                          f"{escape(str(exc))} "
                          "(please report this)", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
