"""``python -m syncbn_cli`` is ``syncbn``."""

from syncbn_cli.main import main

# Guarded: a rank process started with spawn imports the parent's main module again.
if __name__ == "__main__":
    main()
