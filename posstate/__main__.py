"""``python -m posstate``: the same command line as the ``posstate`` console script."""

from posstate.cli.main import main

if __name__ == "__main__":
    main()
