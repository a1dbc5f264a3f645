"""`python -m minlora ...` is the `minlora` command."""
import sys

from .cli import main

sys.exit(main())
