"""`python -m gptfast.cli ...` (e.g. under torchrun) runs the `gptfast` command."""

import sys

from gptfast.cli import main

sys.exit(main())
