"""`python -m tp_runtime ...` is `tp-run ...` (the form torchrun and the spawner start)."""

import sys

from tp_runtime.cli import main

sys.exit(main())
