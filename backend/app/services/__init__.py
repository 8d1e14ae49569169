"""Services over the database and the models."""
