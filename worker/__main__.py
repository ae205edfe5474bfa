"""``python -m worker``: the same as the ``chat-worker`` command."""

from worker.cli import main

main()
