"""The ``syncbn`` command line: convert, verify, bench, inspect and revert (typer + rich).

Commands parse their options, make one library call and render the result; the logic
lives in the ``syncbn`` package.
"""
