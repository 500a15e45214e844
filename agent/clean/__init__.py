"""Changing the NAS: direct deletes, plans and the jobs that apply them, through one
executor, audited before anything changes."""
