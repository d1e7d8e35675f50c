"""`python -m monq`: the same as the `monq` command."""

from monq.cli import main

raise SystemExit(main())
