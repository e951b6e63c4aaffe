"""``python -m curvzo``: the command line, also as torchrun's module (``torchrun ... -m curvzo train``)."""

import sys

from .cli import main

sys.exit(main())
