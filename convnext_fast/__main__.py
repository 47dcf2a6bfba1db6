import sys

from convnext_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
