"""``python -m metagrad``: the command line (see :mod:`metagrad.cli`)."""

from metagrad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
