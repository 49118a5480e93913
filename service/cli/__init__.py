"""`evomerge` command line: `main` parses the arguments (`service.cli.parser`), runs the command
(`service.cli.library`: merge, evolve, plan, export, zoo, compress, cache, methods, irt;
`service.cli.service`: serve, worker, submit, status, cancel, download, benchmark, demo) and
turns its errors into one line on stderr and an exit status: 1 for a plan that does not fit,
2 for a refused input, 130 / 143 for ^C / SIGTERM."""
from __future__ import annotations

import sys

from pydantic import ValidationError

from .library import DoesNotFit, cmd_evolve, cmd_export, cmd_merge
from .parser import build_parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like ^C (cleanup on the way out) but reported as 128 + 15."""


def _interrupt(signum, frame):
    raise Terminated


def spec_errors(e: ValidationError) -> str:
    """Every error of an invalid spec, each named by its field as the API names it."""
    from service.schemas import describe_error

    return "; ".join(f"{field}: {msg}" if field else msg for field, msg in map(describe_error, e.errors()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.errors import CheckpointError

    if args.func in (cmd_merge, cmd_evolve, cmd_export):  # SIGTERM (timeout, docker, systemd) cleans up like ^C
        import signal

        signal.signal(signal.SIGTERM, _interrupt)

    try:
        args.func(args)
    except DoesNotFit as e:
        print(f"evomerge: does not fit: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        print(f"evomerge: error: invalid spec: {spec_errors(e)}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as e:
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"evomerge: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0
