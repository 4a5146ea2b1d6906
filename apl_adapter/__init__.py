"""apl-adapter: Anonymization Prompt Learning as a PEFT adapter."""

__version__ = "0.1.0"
