"""``python -m jaxlora``: the command line (see jaxlora.cli)."""

import sys

from jaxlora.cli import main

sys.exit(main())
