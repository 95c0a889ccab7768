import sys

from bench.cli import main

# Guarded: multiprocessing children (the --memory probes) may import the main module.
if __name__ == "__main__":
    sys.exit(main())
