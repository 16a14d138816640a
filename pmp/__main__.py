import sys

from pmp.cli import main

sys.exit(main())
