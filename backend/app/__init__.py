"""Backend application: resources, sparse lexical search and text classification."""
