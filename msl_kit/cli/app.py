"""`msl-kit`: the parser of every command, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

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


def _notes() -> None:
    """Show config notes (an old key that still loads) as one `note:` line each."""
    from msl_kit.train.old_keys import ConfigNote

    shown = warnings.showwarning
    if getattr(shown, "msl_kit_notes", False):  # main called again in one process
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if issubclass(category, ConfigNote):
            print(f"note: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.msl_kit_notes = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point of `msl-kit`. Every error msl_kit raises on purpose (`MslKitError`) and every
    OSError from the environment (a full disk, a permission, a missing path) is one `error:`
    line and exit status 2; a diverged run is one line and exit 1; anything else is a bug:
    its traceback, a line asking to report it, exit 1 (MSL_KIT_DEBUG=1: every traceback)."""
    # Before torch is first imported: OpenMP's default spin-waiting made 2 busy cores ~10x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from msl_kit.errors import MslKitError
    from msl_kit.train.config import import_plugins
    from msl_kit.train.trainer import DivergenceError

    _notes()
    debug = bool(os.environ.get("MSL_KIT_DEBUG"))
    try:
        import_plugins(list(getattr(args, "plugin", None) or []))  # the user's own --plugin
        return args.func(args)
    except (MslKitError, OSError) as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1 if isinstance(e, DivergenceError) else 2
    except KeyboardInterrupt as e:
        out = getattr(e, "out", None)
        if out is not None:
            print(f"\n{e}. Continue with: msl-kit train --resume {out}", file=sys.stderr)
        else:
            print("\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "error: this is a bug in msl-kit, not a problem with your input; please report it "
            "with the command you ran and the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
