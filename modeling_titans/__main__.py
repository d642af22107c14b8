"""`python -m modeling_titans ...` is the `titans` command line."""

import sys

from .cli import main

sys.exit(main())
