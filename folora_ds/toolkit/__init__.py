"""See README.md in this folder: what this room owns, what it may import and what it must never import."""
