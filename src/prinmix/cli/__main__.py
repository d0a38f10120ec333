"""`python -m prinmix.cli ...`: the same as the `prinmix` console script."""

import sys

from . import main

sys.exit(main())
