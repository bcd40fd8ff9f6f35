class XmasError(Exception):
    """A problem with the user's input or setup: reported as one clear line, without a traceback."""
