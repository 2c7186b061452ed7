"""`python -m onelayer_fast ...`: the `onelayer-fast` command line (and what torchrun starts with
`torchrun --nproc-per-node N -m onelayer_fast train ...`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
