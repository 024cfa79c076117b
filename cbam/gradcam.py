"""``python -m cbam.gradcam CKPT [CKPT ...]``: see :mod:`cbam.analysis.gradcam`."""

import sys

from cbam.analysis.gradcam import main

if __name__ == "__main__":
    sys.exit(main())
