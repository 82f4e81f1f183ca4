"""`python -m maverick_quant` runs the CLI."""

from maverick_quant.cli import main

if __name__ == "__main__":
    main()
