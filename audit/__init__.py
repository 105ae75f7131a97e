"""The append-only audit log: its one writer (``audit.services``), its verbs and its readers.
Every other app records through ``audit.services``; nothing here imports another app."""
