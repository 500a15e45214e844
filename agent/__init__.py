"""nas-janitor agent: a small REST service that finds and safely removes leaked btrfs
subvolumes left by Docker on a NAS."""

__version__ = "0.3.0"
