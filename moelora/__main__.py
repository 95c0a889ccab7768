"""`python -m moelora convert ...` / `python -m moelora inspect ...`: see moelora.cli."""

import sys

from moelora.cli import main

sys.exit(main())
