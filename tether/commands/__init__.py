"""Subcommands of the ``tether`` CLI, one module each (see ``tether.cli``)."""
