"""The hostile input corpus: see README.md."""
