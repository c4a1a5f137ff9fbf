"""The `expman` command."""
