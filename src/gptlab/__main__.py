"""`python -m gptlab ...`, which is also what `torchrun -m gptlab train ...` runs."""

from gptlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
