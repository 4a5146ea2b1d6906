"""Research probes, not library API: each file runs as ``python experiments/<file>.py --help`` (see README.md).

A package only so that the tests (and doctests) can import them as ``experiments.<file>``; not installed.
"""
