"""User-facing commands built on the library.  Each entry function takes plain
keyword arguments; kvmlite/cli.py turns the command line into them."""
