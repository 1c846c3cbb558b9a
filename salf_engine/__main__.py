"""`python -m salf_engine` = the `salf` command."""

import sys

from salf_engine.cli.commands import main

sys.exit(main())
