import gc
import sys

from monq.engine.engine import main

code = main()
# The engine has closed its sockets and said goodbye.  Freezing what is alive now keeps
# the interpreter's last garbage collections from walking every object of every module
# (0.05-0.3 s on a busy machine, more after a task imported numpy or pandas); objects are
# still released, and atexit handlers still run, as in any exit.
gc.freeze()
sys.exit(code)
