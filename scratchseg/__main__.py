"""``python -m scratchseg ...`` runs the ``scratchseg`` command."""

import sys

from .cli import main

sys.exit(main())
