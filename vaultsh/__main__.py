import sys

from vaultsh.cli import main

sys.exit(main())
