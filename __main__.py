"""``python -m vfmtok ...`` (and ``accelerate launch -m vfmtok ...``): the ``vfmtok`` command line."""
import sys

from vfmtok.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
