import sys

from dpolab.cli import main

sys.exit(main())
