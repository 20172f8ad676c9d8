"""One module per family of subcommands; each defines `register(subparsers)`."""
