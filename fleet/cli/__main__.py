"""`python -m fleet.cli`: the `fleet` command."""

from fleet.cli import main

main()
