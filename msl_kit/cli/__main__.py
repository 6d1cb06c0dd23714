"""`python -m msl_kit.cli ...` (what torchrun runs) is `msl-kit ...`."""

import sys

from msl_kit.cli.app import main

sys.exit(main())
