"""``python -m e2pa`` runs the command line."""

import sys

from e2pa.cli import main

sys.exit(main())
