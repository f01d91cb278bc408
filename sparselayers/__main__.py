import sys

from sparselayers.cli import main

sys.exit(main())
