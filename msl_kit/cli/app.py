"""`msl-kit`: the parser of every command, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import os
import sys

from msl_kit.cli.bench import add_bench_command
from msl_kit.cli.prepare import add_prepare_command
from msl_kit.cli.run import add_run_commands
from msl_kit.cli.sweep import add_sweep_command
from msl_kit.cli.use import add_use_commands


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `msl-kit`: each command family adds its own subcommands."""
    parser = argparse.ArgumentParser(
        prog="msl-kit", description="Multi-Similarity loss research kit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)  # train, evaluate
    add_prepare_command(sub)
    add_bench_command(sub)
    add_sweep_command(sub)
    add_use_commands(sub)  # embed, search, export
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `msl-kit`; every anticipated failure prints one line and returns 2."""
    # Before torch is first imported: OpenMP's default spin-waiting made 2 busy cores ~10x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from msl_kit.files.atomic import CheckpointError
    from msl_kit.train.validation import ConfigError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, OSError, ValueError, TypeError) as e:
        if os.environ.get("MSL_KIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from msl_kit.train.trainer import DivergenceError

        if os.environ.get("MSL_KIT_DEBUG") or not isinstance(e, DivergenceError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        out = getattr(e, "out", None)
        if out is not None:
            print(f"\n{e}. Continue with: msl-kit train --resume {out}", file=sys.stderr)
        else:
            print("\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
