"""``python -m kdcore`` is the ``kdcore`` console command."""

from .cli import main

raise SystemExit(main())
