"""``python -m cli``: the ``kdgate`` command (the benches start the gateway this way)."""

import sys

from cli.app import main

sys.exit(main())
