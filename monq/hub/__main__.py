import sys

from monq.hub.controller import main

sys.exit(main())
