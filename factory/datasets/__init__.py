"""Dataset loaders. Each turns a public format into raw Arrow tables; `ingest` normalises them."""
