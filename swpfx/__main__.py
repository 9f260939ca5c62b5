"""``python -m swpfx``: the same as the ``swpfx`` console script."""

import sys

from swpfx.cli import main

sys.exit(main())
