"""``python -m medsteer_core.mini train ...``: train MedSteer-mini again (see ``model.main``)."""

import sys

from .model import main

if __name__ == "__main__":
    sys.exit(main())
