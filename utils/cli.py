"""The argument parser of the tools under utils/: a usage error is one line on stderr and exit status 2, as main.py's
are, not argparse's usage block."""
import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
