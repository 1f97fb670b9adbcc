"""Examples of backends that use tokenrelay (importable, so tests can serve them)."""
