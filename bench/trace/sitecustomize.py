"""Bench-only: loaded by every Python process started with bench/trace on PYTHONPATH.

When MONQ_TRACE_DIR is set, an engine process records when each step of a
task happens (time.perf_counter_ns, the same clock in every process) and
writes them to MONQ_TRACE_DIR/<pid>.json at exit.  Nothing of this is in
monq itself: see bench/trace_roundtrip.py.
"""

import os

if os.environ.get("MONQ_TRACE_DIR"):
    import sys

    if "monq.engine" in sys.orig_argv:
        import tracehooks

        tracehooks.install_engine()
