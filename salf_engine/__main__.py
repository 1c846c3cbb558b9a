"""`python -m salf_engine` = the `salf` command."""

import sys

from .cli import main

sys.exit(main())
