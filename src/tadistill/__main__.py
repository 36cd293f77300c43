"""``python -m tadistill`` (also what ``accelerate launch -m tadistill`` runs)."""

import sys

from tadistill.cli.main import main

sys.exit(main())
