"""Small CLI commands that are not workflows (``info``)."""
