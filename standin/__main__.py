"""`python -m standin [--legacy-only] [--port N]`: run the stand-in alone; prints its URL."""

import sys

from .server import main

sys.exit(main())
