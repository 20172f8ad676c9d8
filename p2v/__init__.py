"""p2v: the application. The `p2v` command, SSH sessions, the imaging agent, clone/sync."""

__version__ = "0.1.0"
