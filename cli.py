"""Run the posstate command line from a checkout: ``python cli.py --help``."""

from posstate.cli.main import main

if __name__ == "__main__":
    main()
