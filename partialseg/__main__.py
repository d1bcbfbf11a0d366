import sys

from partialseg.cli import main

sys.exit(main())
