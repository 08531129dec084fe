"""``python -m peft_locas``: the ``peft-locas`` command line."""

import sys

from .cli import main

sys.exit(main())
