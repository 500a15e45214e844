"""HTTP views: thin. Each loads its input with a schema, calls the domain service and
dumps the answer with a schema; errors are raised and rendered by ``agent.api``."""
