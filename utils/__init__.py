"""Small mechanisms every part of the project shares: atomic file and folder writes, CLI logging."""
