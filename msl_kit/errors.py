"""The base of every error msl_kit raises on purpose: `MslKitError`.

A bottom module that imports nothing: each layer defines its own errors (a config, data, a
checkpoint, an index file, an export) as subclasses where the concept lives, and the CLI turns
any `MslKitError` into one `error:` line with exit status 2. Anything else that escapes is a
bug in msl_kit and keeps its traceback.
"""

from __future__ import annotations


class MslKitError(Exception):
    """A problem with what the user gave msl_kit; the message says what to do about it."""
