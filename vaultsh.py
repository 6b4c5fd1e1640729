#!/usr/bin/env python3
"""`python vaultsh.py ...` behaves exactly like the installed `vaultsh ...`."""

import sys

from vaultsh.cli import main

if __name__ == "__main__":
    sys.exit(main())
