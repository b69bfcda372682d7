import sys

from poolport.tools.cli import main

sys.exit(main())
