"""``python -m kdseg.study NAME [key=value ...] [-- job overrides ...]`` (see :mod:`kdseg.study`)."""
import sys

from kdseg.study import main

sys.exit(main())
