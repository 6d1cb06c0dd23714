"""The `msl-kit` command line: a thin shell over the library (`msl_kit.cli.app`)."""

from msl_kit.cli.app import main

__all__ = ["main"]
