"""Code both the agent and the controller use: the API's schemas and models."""
