import gc
import sys

# No cyclic garbage collection while the engine's modules are imported, then freeze what
# they made: later collections (while tasks run) skip those objects.
gc.disable()
from monq.engine.engine import main  # noqa: E402

gc.freeze()
gc.enable()
code = main()
# The engine has closed its sockets and said goodbye.  Freezing what is alive now keeps
# the interpreter's last garbage collections from walking every object of every module
# (0.05-0.3 s on a busy machine, more after a task imported numpy or pandas); objects are
# still released, and atexit handlers still run, as in any exit.
gc.freeze()
sys.exit(code)
