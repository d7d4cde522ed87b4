"""Small helpers every room may use: the user-error type, atomic file writes, optional dependencies,
the environment record, progress lines and terminal-safe text. Imports nothing else from cdi."""
