"""``python -m cbam.export``: see :mod:`cbam.inference.export`."""

import sys

from cbam.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
