"""Writers of warehouse data as files that other tools read (training caches, ...)."""
