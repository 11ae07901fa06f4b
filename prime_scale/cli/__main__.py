"""`python -m prime_scale.cli COMMAND ...`: the same as the `prime-scale` console script."""

import sys

from prime_scale.cli import main

sys.exit(main())
