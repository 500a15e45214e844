"""The real agent under gunicorn for tests: see ``lab.agentproc``."""

from lab.agentproc import AgentProcess, Pki, free_port, running_agent, start_agent, write_config

__all__ = ["AgentProcess", "Pki", "free_port", "running_agent", "start_agent", "write_config"]
