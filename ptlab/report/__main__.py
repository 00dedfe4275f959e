import sys

from ptlab.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
