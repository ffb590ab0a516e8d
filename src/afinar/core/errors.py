"""The one exception type users see: its message is printed as a single line by the CLI."""


class AfinarError(Exception):
    """A problem with the user's input or environment, with a message that says what to fix."""
