"""``python -m tofu_triton``: the command line of :mod:`tofu_triton.cli` (the same as ``tofu-triton``)."""
import sys

from tofu_triton.cli import main

if __name__ == "__main__":
    sys.exit(main())
