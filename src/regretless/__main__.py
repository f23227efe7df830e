"""`python -m regretless ...` (what `torchrun -m regretless ...` runs): the `regretless` command."""

import sys

from regretless.cli import main

if __name__ == "__main__":
    sys.exit(main())
