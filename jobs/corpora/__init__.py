"""Scripts that build reproducible corpora from files a fresh machine already has."""
