"""``python -m medsteer_core.mini train ...``: train MedSteer-mini again (see ``train.main``)."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
