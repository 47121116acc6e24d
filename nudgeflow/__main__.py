"""`python -m nudgeflow`: the same command line as `nudgeflow`."""

from nudgeflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
