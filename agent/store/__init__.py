"""What the agent keeps on disk in its state directory: the hash-chained audit log
(``audit``), plans, jobs and results (``state``), over durable SQLite (``sqlite``)."""
