"""``python -m kdcore`` is the ``kdcore`` console command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
