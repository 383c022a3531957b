"""`python -m rap.cli ...` is the `rap` command."""

import sys

from rap.cli.main import main

sys.exit(main())
