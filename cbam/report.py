"""``python -m cbam.report <sweep dir> [--out results/<study>]``: see :mod:`cbam.analysis.report`."""

import sys

from cbam.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
