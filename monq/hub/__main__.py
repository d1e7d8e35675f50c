import atexit
import gc
import os
import sys

# No cyclic garbage collection while SQLAlchemy and the rest are imported (they allocate
# hundreds of thousands of long-lived objects: the collector would walk them again and
# again, ~15 % of the import time), then freeze them: later collections skip them too.
gc.disable()
from monq.hub.controller import main  # noqa: E402

gc.freeze()
gc.enable()
code = main()
# The controller has flushed and closed its store, closed its sockets and removed its
# connection file: nothing is left to do but the interpreter's teardown, which frees
# SQLAlchemy's thousands of objects one by one (0.2-0.4 s on a busy machine, all of it
# on the path of `monq stop`).  Run the atexit handlers (logging's flush), flush the
# streams, and leave.
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
