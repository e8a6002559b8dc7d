"""``python -m coffre_client seal|open`` (see :mod:`coffre_client.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
