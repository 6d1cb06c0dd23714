"""The `msl-kit` command line: a thin shell over the library (`msl_kit.cli.main`)."""

from msl_kit.cli.main import main

__all__ = ["main"]
