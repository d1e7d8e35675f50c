import sys

from monq.engine.engine import main

sys.exit(main())
