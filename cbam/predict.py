"""``python -m cbam.predict``: see :mod:`cbam.inference.predict`."""

import sys

from cbam.inference.predict import main

if __name__ == "__main__":
    sys.exit(main())
