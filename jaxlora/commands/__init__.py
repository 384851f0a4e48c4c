"""jaxlora.commands: the logic of the CLI commands (flags -> library calls), one module per group."""
