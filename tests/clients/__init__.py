"""Third-party clients (lm-evaluation-harness, guidellm) against a live ``layerskip-serve``."""
