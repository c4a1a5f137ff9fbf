import sys

from ._daemon import main

sys.exit(main())
