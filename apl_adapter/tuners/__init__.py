"""PEFT tuners apl-adapter adds, one folder per method as in ``peft.tuners``."""
