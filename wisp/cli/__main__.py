"""`python -m wisp.cli` runs the `wisp` command (handy before the package is installed)."""

from wisp.cli.main import main

main()
