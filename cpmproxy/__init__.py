"""cpmproxy: an OMA CPM message-storage proxy in front of a standard IMAP server."""

__version__ = "0.1.0"
