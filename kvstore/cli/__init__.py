"""Console entry points: ``kvstore`` (the daemon) and ``kvctl`` (the admin CLI)."""
