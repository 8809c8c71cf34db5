"""`python -m vaecli.cli`."""

from vaecli.cli import main

main()
