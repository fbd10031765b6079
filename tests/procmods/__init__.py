"""Processor modules for the system-proc tests (importable as ``procmods.<module>:<function>``)."""
