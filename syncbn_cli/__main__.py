"""``python -m syncbn_cli`` is ``syncbn``."""

from syncbn_cli.main import main

main()
