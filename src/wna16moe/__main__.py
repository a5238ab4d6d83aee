import sys

from wna16moe.cli import main

sys.exit(main())
