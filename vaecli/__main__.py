"""`python -m vaecli`: the same as the `vaecli` command."""

from vaecli.cli import main

if __name__ == "__main__":
    main()
