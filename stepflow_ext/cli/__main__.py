"""`python -m stepflow_ext.cli ...`: the `stepflow` command without installing the console script."""
import sys

from .app import main

sys.exit(main())
