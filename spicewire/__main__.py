"""``python -m spicewire`` is the ``spicewire`` command."""

from spicewire.cli import main

raise SystemExit(main())
