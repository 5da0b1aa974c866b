"""`python -m lmforge` runs the same command as `lmforge`."""

import sys

from .cli import main

sys.exit(main())
