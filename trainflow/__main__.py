"""`python -m trainflow ...`: the `trainflow` command."""

from trainflow.flows.cli import _entry

if __name__ == "__main__":
    _entry()
