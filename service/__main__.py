"""`python -m service ...` is the `mailbox` command (see service/cli.py)."""

import sys

from .cli import main

sys.exit(main())
