"""``python -m server`` is ``layerskip-serve``."""

from server.cli import main

main()
