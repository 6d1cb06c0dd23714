"""`python -m msl_kit.cli ...` (what torchrun runs) is `msl-kit ...`."""

import sys

from msl_kit.cli.main import main

sys.exit(main())
