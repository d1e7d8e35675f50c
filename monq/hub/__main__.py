import atexit
import os
import sys

from monq.hub.controller import main

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
