"""`python -m chips_core.cli ...` runs `chips ...`."""

import sys

from chips_core.cli.main import main

sys.exit(main())
